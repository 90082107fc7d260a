"""Objectives: what a run optimizes, one module each (causal_lm, instructions,
classification, tagging, distill, fim, mlm, reading), found by name (`task.kind` in the config).

An objective owns everything that differs between them, and nothing else does:
- what a record becomes (`encode`: the document's token ids, which of them are
  targets, a label) and how rows are laid out (`layout`: packed documents or one
  example per row, with or without a loss mask), the record features it reads
  (`features`) and the text its tokenizer is trained on (`sample_text`);
- the attention mask kind its model runs with (`attention`: causal, prefix or
  bidirectional; model/kernels.py);
- its loss and eval (`loss`, `eval_sums`, `eval_metrics`, and `metrics`: the eval
  numbers with the way each improves);
- whether it generates text, and how a prompt is formatted for it (`chat_prompt`;
  `infill_prompt` where it fills in the middle), and the special tokens it adds to
  the tokenizer (`sentinels`);
- its own config rules (`check`).
The input pipeline (data/), the train step (training/) and the model (model/) never
ask which objective runs. A new one is a module with a `build(config, class_names)`
and a line in BUILDERS (or `register` from outside the package).
"""

from tpu_lm.errors import UserError
from tpu_lm.tasks import causal_lm, classification, distill, fim, instructions, mlm, reading, tagging

BUILDERS = {causal_lm.NAME: causal_lm.build, instructions.NAME: instructions.build,
            classification.NAME: classification.build, distill.NAME: distill.build, fim.NAME: fim.build,
            mlm.NAME: mlm.build, tagging.NAME: tagging.build, reading.NAME: reading.build}


def register(name: str, build) -> None:
  """Adds an objective: `build(config, class_names)` returns it."""
  BUILDERS[name] = build


def names() -> tuple[str, ...]:
  return tuple(BUILDERS)


def name_of(config) -> str:
  """The objective a config names. Configs and run directories written before the
  objectives had names of their own said "lm" for instruction tuning (its
  dataset: data.dataset="instructions") and for distillation (distill.teacher set)."""
  kind = config.task.kind
  if kind == causal_lm.NAME and config.data.dataset == instructions.DATASET:
    return instructions.NAME
  if kind == causal_lm.NAME and config.distill.teacher:
    return distill.NAME
  return kind


def from_config(config, class_names=()):
  """The config's objective (UserError naming the known ones for another name)."""
  name = name_of(config)
  if name not in BUILDERS:
    raise UserError(f"config field task.kind is {config.task.kind!r}: use one of {', '.join(map(repr, BUILDERS))}.")
  return BUILDERS[name](config, tuple(class_names))
