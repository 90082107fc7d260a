"""A search space over config fields, written on the command line.

One entry per parameter, `FIELD=KIND(ARGS)`, entries separated by ";" or given as
repeated --space flags:

  optim.learning_rate=loguniform(1e-4, 1e-2)   a float, log-uniform in [lo, hi]
  optim.b2=uniform(0.9, 0.999)                 a float, uniform in [lo, hi]
  model.num_layers=int(1, 4)                   an integer in [lo, hi], both included
  data.global_batch_size=intlog(4, 64)         an integer, log-uniform
  optim.schedule=choice(cosine, linear)        one of the values (numbers, True/False, words)

FIELD is any config field (dotted, as in --config.FIELD=VALUE); its type in the
config decides what a value may be, checked here before any trial runs.
"""

import ast
import dataclasses
import re

from tpu_lm.errors import UserError

KINDS = ("uniform", "loguniform", "int", "intlog", "choice")
_ENTRY = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*=\s*(\w+)\s*\((.*)\)\s*$")


@dataclasses.dataclass(frozen=True)
class Param:
  field: str
  kind: str
  args: tuple

  def suggest(self, trial):
    """This parameter's value for an Optuna trial."""
    if self.kind == "choice":
      return trial.suggest_categorical(self.field, list(self.args))
    lo, hi = self.args
    if self.kind in ("int", "intlog"):
      return trial.suggest_int(self.field, lo, hi, log=self.kind == "intlog")
    return trial.suggest_float(self.field, lo, hi, log=self.kind == "loguniform")

  def __str__(self):
    return f"{self.field}={self.kind}({', '.join(map(str, self.args))})"


def parse(specs: list[str], config) -> list[Param]:
  """The parameters of `specs` (each one or more ";"-separated entries), checked
  against `config`'s fields."""
  entries = [e for spec in specs for e in spec.split(";") if e.strip()]
  if not entries:
    raise UserError("--space is empty: give at least one FIELD=KIND(ARGS), e.g."
                    " --space='optim.learning_rate=loguniform(1e-4, 1e-2)'.")
  params = [_parse_entry(e, config) for e in entries]
  seen = [p.field for p in params]
  if dup := sorted({f for f in seen if seen.count(f) > 1}):
    raise UserError(f"--space names {', '.join(dup)} more than once: give each field one entry.")
  return params


def _parse_entry(entry: str, config) -> Param:
  m = _ENTRY.match(entry)
  if not m:
    raise UserError(f"--space entry {entry.strip()!r} is not FIELD=KIND(ARGS): write e.g."
                    " optim.learning_rate=loguniform(1e-4, 1e-2).")
  field, kind, raw = m.groups()
  if kind not in KINDS:
    raise UserError(f"--space entry {entry.strip()!r}: unknown kind {kind!r}; use one of {', '.join(KINDS)}.")
  current = _current(config, field)
  args = tuple(_value(a.strip()) for a in raw.split(",") if a.strip())
  where = f"--space entry {entry.strip()!r}"
  if kind == "choice":
    if not args:
      raise UserError(f"{where}: choice() needs at least one value.")
    for a in args:
      _check_type(where, field, current, a)
    return Param(field, kind, args)
  if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
    raise UserError(f"{where}: {kind}() takes two numbers, low and high.")
  lo, hi = args
  if not lo < hi:
    raise UserError(f"{where}: the low end {lo} must be below the high end {hi}.")
  if kind in ("loguniform", "intlog") and lo <= 0:
    raise UserError(f"{where}: a log scale needs a positive low end, not {lo}.")
  if kind in ("int", "intlog"):
    if not (float(lo).is_integer() and float(hi).is_integer()):
      raise UserError(f"{where}: {kind}() takes whole numbers.")
    if not isinstance(current, int) or isinstance(current, bool):
      raise UserError(f"{where}: config field {field} holds {type(current).__name__}, not an integer:"
                      " use uniform or loguniform.")
    lo, hi = int(lo), int(hi)
  elif not isinstance(current, float):
    raise UserError(f"{where}: config field {field} holds {type(current).__name__}, not a float:"
                    f" use {'int or intlog' if isinstance(current, int) else 'choice'}.")
  return Param(field, kind, (lo, hi))


def _current(config, field: str):
  node = config
  for i, part in enumerate(field.split(".")):
    if not hasattr(node, "keys") or part not in node:
      raise UserError(f"--space names config field {field}, which the config does not have"
                      f" ({'.'.join(field.split('.')[:i]) or 'the top level'} has no {part!r}).")
    node = node[part]
  if hasattr(node, "keys"):
    raise UserError(f"--space names {field}, a section of the config: name one of its fields.")
  return node


def _value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare word: a string choice


def _check_type(where, field, current, value) -> None:
  ok = (isinstance(value, type(current)) or (isinstance(current, float) and isinstance(value, int)
                                             and not isinstance(value, bool)))
  if current is not None and not ok:
    raise UserError(f"{where}: {value!r} is not a {type(current).__name__}, the type of config field {field}.")


def apply(config, values: dict):
  """A copy of `config` with the trial's values set."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for field, value in values.items():
      *path, last = field.split(".")
      node = config
      for part in path:
        node = node[part]
      node[last] = float(value) if isinstance(node[last], float) else value
  return config
