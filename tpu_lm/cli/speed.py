"""This machine's CPU speed factor: tpu-lm speed (python -m tpu_lm.speed) [--repeats=10] [--json].

Times one fixed training step (tpu_lm/speed_factor.py: GPT-2 style, 2 layers x 160,
batch 32 x 256, float32, AdamW) against the 2-core reference machine's 410 ms and prints
one line, then the same as JSON (--json: the JSON only). A factor of 0.5 means this
machine is half as fast: double every wall time the configs and experiments quote.
Takes about 10 seconds on a 2-core CPU; run nothing else meanwhile.
"""

import json

from absl import flags

from tpu_lm import cli

_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps after the 4 warm-up steps; their median is the step.")
_JSON = flags.DEFINE_bool("json", False, "Print only the JSON line.")
cli.positive(_REPEATS)


def body() -> None:
  from tpu_lm import speed_factor

  measured = speed_factor.measure(_REPEATS.value)
  if not _JSON.value:
    print(speed_factor.line(measured))
  print(json.dumps(measured))
