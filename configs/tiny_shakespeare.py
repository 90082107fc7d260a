"""A TFDS catalog dataset: tiny_shakespeare, byte-level (downloads ~1 MB on first use).

Command (needs a network connection the first time):
  python -m tpu_lm.main --config=configs/tiny_shakespeare.py

The same model and loop as the defaults (the base config's model, AdamW and cosine) on the TFDS `tiny_shakespeare` dataset
(one document per split), with a byte tokenizer. Not measured here: the machines
this project is developed on have no network.
"""

from tpu_lm.config import defaults


def get_config():
  c = defaults.get_config()  # the AdamW base's model and loop (configs/base.py adds the speedrun recipe)
  c.data.dataset = "tiny_shakespeare"
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.text_key = "text"
  c.data.tokenizer = "bytes"
  c.eval_every_steps = 200
  return c
