"""Encoder config: a small BERT-style masked language model on the Python standard
library, on a CPU: configs/base.py's width, data, recipe and steps, with the masked-LM
objective (tasks/mlm.py: 15% of tokens chosen, 80/10/10 mask/random/keep, attention
both ways within each document), BERT's blocks and tied prediction head, and rotary
positions.

Command:
  python -m tpu_lm.main --config=configs/encoder.py

Measured 2026-12-04 on a 2-core CPU by experiments/encoder/run.py: final eval on a fixed
mask of the whole validation split (96,102 masked tokens): masked-token accuracy 0.4943,
3.7117 bits (2.5728 nats) per masked token. Fine-tuned, it classifies stdlib functions
and tags Python tokens: docs/encoders.md has the table against the base decoder.
Exported (python -m tpu_lm.convert --to_hf=DIR --workdir=RUN) it is a
RoFormerForMaskedLM that transformers' fill-mask pipeline reads.
Whole-word masking: --config.mlm.whole_word=True.
"""

from configs import base
from tpu_lm.config import defaults


def get_config():
  c = base.get_config()
  c.task.kind = "mlm"
  # BERT's layout (post-norm blocks, exact GELU, its prediction head over the tied
  # embedding) with rotary positions: RoFormer's, so the run exports as a
  # RoFormerForMaskedLM (--to_hf; transformers' fill-mask pipeline reads it). A learned
  # position table, BERT's own, learned next to no word order in the same steps (at 300
  # steps: 5.68 nats per masked token against 4.98; docs/encoders.md). The width, depth
  # and heads stay the base's.
  heads = c.model.num_heads
  defaults.bert_block(c.model)
  c.model.position = "rope"
  c.model.num_heads, c.model.mlp_dim = heads, 4 * c.model.d_model
  c.sample.num_prompts = 0  # an encoder samples nothing left to right
  return c
