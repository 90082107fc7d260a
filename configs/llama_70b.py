"""Llama-style 70B (Llama 3 shape): 80 layers, width 8192, 64 query / 8 KV heads,
SwiGLU 28672, T=4096, vocab 32768, on C4.

Target: TPU v5p-512 (256 chips, 64 hosts), FSDP with full rematerialisation.
Check it fits (no TPU needed):
  python -m tpu_lm.main --config=configs/llama_70b.py --compile_for=v5p-512
(README "Real-size configs" has the measured report.) On the slice, every host runs
the same command with --distributed (jax.distributed.initialize finds the others).
"""

from configs import at_scale


def get_config():
  c = at_scale.config(family="llama", layers=80, d_model=8192, heads=64, kv_heads=8, mlp_dim=28672,
                      vocab=32768, seq_len=4096, batch=512, steps=100_000, lr=1.5e-4)
  c.mesh.preset = "fsdp"
  c.model.remat = "full"
  return c
