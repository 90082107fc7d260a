"""Llama-family config: RoPE, RMSNorm, SwiGLU, grouped-query attention, untied embeddings.

Command:
  python -m tpu_lm.main --config=configs/llama_small.py

The base config's corpus, tokenizer, length and optimizer with the Llama block, at a
similar cost per step. Hardware, wall time and result: README.md ("Configs").
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.norm = "rmsnorm"
  c.model.position = "rope"
  c.model.mlp = "swiglu"
  c.model.use_bias = False
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.mlp_dim = 416  # ~2/3 of 4*d, so SwiGLU's three matrices cost what GELU's two do
  c.model.tie_embeddings = False
  return c
