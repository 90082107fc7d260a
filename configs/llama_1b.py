"""Llama-style 1B: 16 layers, width 2048, 32 query / 8 KV heads, SwiGLU 8192,
T=2048, vocab 32768, on C4.

Target: TPU v5p-8 (4 chips), FSDP; also the ~1B GPU throughput config
(experiments/throughput). Check it fits (no TPU needed):
  python -m tpu_lm.main --config=configs/llama_1b.py --compile_for=v5p-8
(README "Real-size configs" has the measured report.)
"""

from configs import at_scale


def get_config():
  c = at_scale.config(family="llama", layers=16, d_model=2048, heads=32, kv_heads=8, mlp_dim=8192,
                      vocab=32768, seq_len=2048, batch=256, steps=50_000, lr=3e-4)
  c.mesh.preset = "fsdp"
  c.model.remat = "dots_no_batch"
  # 256 x 2048 tokens at once need 116 GiB of temporaries per v5p chip (108 with the
  # logits made 256 positions at a time); two microbatches as well fit.
  c.model.logits_chunk = 256
  c.optim.grad_accum_steps = 2
  return c
