"""Llama-style 8B (Llama 3 shape): 32 layers, width 4096, 32 query / 8 KV heads,
SwiGLU 14336, T=4096, vocab 32768, on C4.

Target: TPU v5p-64 (32 chips, 8 hosts), FSDP with full rematerialisation.
Check it fits (no TPU needed):
  python -m tpu_lm.main --config=configs/llama_8b.py --compile_for=v5p-64
(README "Real-size configs" has the measured report.)
"""

from configs import at_scale


def get_config():
  c = at_scale.config(family="llama", layers=32, d_model=4096, heads=32, kv_heads=8, mlp_dim=14336,
                      vocab=32768, seq_len=4096, batch=256, steps=100_000, lr=3e-4)
  c.mesh.preset = "fsdp"
  c.model.remat = "full"
  return c
