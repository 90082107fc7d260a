"""A teacher for distilling the base config: the same data, tokenizer and block, 4x the parameters.

Command:
  python -m tpu_lm.main --config=configs/teacher.py --workdir=workdirs/teacher

4 layers of width 288 (8 query heads sharing 4 KV heads, SwiGLU 768): 4.8M parameters
against the base's 1.2M, 1600 steps of 8 x 256 tokens. Used by experiments/compression
(README "Compression"), where its time and result are recorded.
"""

from tpu_lm.config.defaults import get_config as _defaults


def get_config():
  c = _defaults()
  c.model.update(num_layers=4, d_model=288, num_heads=8, num_kv_heads=4, mlp_dim=768)
  c.num_train_steps = 1600
  c.eval_every_steps = 800
  c.checkpoint_every_steps = 800
  c.optim.learning_rate = 4e-3
  return c
