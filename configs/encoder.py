"""Encoder config: a small BERT-style masked language model on the Python standard
library, on a CPU: configs/base.py's model, data, recipe and steps, with the masked-LM
objective (tasks/mlm.py: 15% of tokens chosen, 80/10/10 mask/random/keep, attention
both ways within each document) and BERT's tied MLM head.

Command:
  python -m tpu_lm.main --config=configs/encoder.py

Its eval reports loss and bits per masked token and masked-token accuracy on a fixed
seeded mask of the whole validation split (docs/encoders.md has the measured numbers).
Whole-word masking: --config.mlm.whole_word=True.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.task.kind = "mlm"
  c.model.tie_embeddings = True  # the MLM head reads the input embedding table, as BERT's
  c.sample.num_prompts = 0  # an encoder samples nothing left to right
  return c
