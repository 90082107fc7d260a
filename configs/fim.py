"""The base model trained to fill in the middle (tasks/fim.py): the base config's data,
tokenizer (plus the four sentinels) and model with the defaults' AdamW and cosine, half the training documents
cut into prefix, middle and suffix and rearranged (PSM or SPM, half each).

Command:
  python -m tpu_lm.main --config=configs/fim.py --workdir=workdirs/fim

Then fill in a middle:
  python -m tpu_lm.generate --workdir=workdirs/fim --prompt='def add(a, b):' --suffix=$'\\n    return c\\n'

Measured 2026-12-03 on a 2-core CPU (speed factor 0.3-0.4, shared with other jobs):
2400 steps in 1015 s; 1.6090 bits/byte left to right on the held-out split, against
1.6028 for configs/base.py on the same budget (+0.0062). What it gives when infilling:
docs/code-completion.md and experiments/fim/.
"""

from tpu_lm.config.defaults import get_config as _defaults


def get_config():
  c = _defaults()
  c.task.kind = "fim"
  # A standard-library file is ~2,500 tokens, a row 256: whole-file FIM puts prefix,
  # suffix and middle in different rows (measured: the model then does not infill).
  # Pieces of up to 512 characters (~180 tokens) are cut and rearranged one by one.
  c.fim.max_chars = 512
  return c
