"""A teacher for distilling the base config: the same data, tokenizer and block, 4x the parameters.

Commands (the teacher of experiments/compression: 1600 steps, then resumed to 3200):
  python -m tpu_lm.main --config=configs/teacher.py --workdir=workdirs/teacher
  python -m tpu_lm.main --config=configs/teacher.py --workdir=workdirs/teacher \
      --config.num_train_steps=3200 --config.eval_every_steps=1600

4 layers of width 288 (8 query heads sharing 4 KV heads, SwiGLU 768): 4.8M parameters
against the base's 1.2M, batch 8 x 256 tokens. Measured 2026-12-01 on a 2-core CPU
(speed factor 0.65, `tpu-lm speed`): 1600 steps in 1088 s reach 1.6858 bits/byte, worse than the base's
1.5938 after 2400 steps: at this batch the 4x model learns about as much per step as
the base (training loss 3.18 against 3.21 at step 1600), so a teacher needs more steps,
not only more parameters. Resumed to 3200 steps (the cosine schedule restarts over the
new total) in 917 s more: 1.5442 bits/byte (loss 3.0076 nats/token), 0.050 below the
AdamW base (configs/base.py's Muon recipe since reaches 1.5030 in its 1.2M parameters). Whole teacher: 2005 s of training on this machine (= 1303 s reference).
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
