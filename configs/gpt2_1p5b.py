"""GPT-2 XL (1.5B): 48 layers, width 1600, 25 heads, T=1024, vocab 50304, on C4.

Target: TPU v5p-32 (16 chips), FSDP. Check it fits (no TPU needed):
  python -m tpu_lm.main --config=configs/gpt2_1p5b.py --compile_for=v5p-32
(README "Real-size configs" has the measured report.)
"""

from configs import at_scale


def get_config():
  c = at_scale.config(family="gpt2", layers=48, d_model=1600, heads=25, kv_heads=0, mlp_dim=6400,
                      vocab=50304, seq_len=1024, batch=512, steps=50_000, lr=2e-4)
  c.mesh.preset = "fsdp"
  c.model.remat = "dots_no_batch"
  return c
