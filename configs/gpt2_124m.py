"""GPT-2 small (124M): 12 layers, width 768, 12 heads, T=1024, vocab 50304, on C4.

Target: one TPU v5p-8 (4 chips), pure data parallelism, or one GPU (see
experiments/throughput). Check it fits (no TPU needed):
  python -m tpu_lm.main --config=configs/gpt2_124m.py --compile_for=v5p-8
  compiled 2026-11-25 (README "Real-size configs"): see the README table for
  HBM per chip and the step time at 40% MFU.
Train (network for C4 the first time; an accelerator):
  python -m tpu_lm.main --config=configs/gpt2_124m.py
"""

from configs import at_scale


def get_config():
  c = at_scale.config(family="gpt2", layers=12, d_model=768, heads=12, kv_heads=0, mlp_dim=3072,
                      vocab=50304, seq_len=1024, batch=512, steps=20_000, lr=6e-4)
  c.mesh.preset = "data_parallel"
  # 512 x 1024 tokens at once need 132 GiB of temporaries per v5p chip; making the
  # 50304-way logits 128 positions at a time and two microbatches of 256 rows: 60 GiB.
  c.model.logits_chunk = 128
  c.optim.grad_accum_steps = 2
  return c
