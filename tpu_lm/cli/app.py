"""The console script: tpu-lm VERB [--flags]  (pip install puts it on PATH).

  tpu-lm train --config=configs/tiny.py        # python -m tpu_lm.main
  tpu-lm generate --workdir=RUN --prompt=...   # python -m tpu_lm.generate
  tpu-lm eval --workdir=RUN --tasks=NAMES     # python -m tpu_lm.evaluate: lm-evaluation-harness tasks
  tpu-lm codebench --workdir=RUN              # python -m tpu_lm.codebench: the offline code benchmark
  tpu-lm serve | convert | compress | inspect | audit | sweep ...
  tpu-lm speed                                 # python -m tpu_lm.speed: this CPU's speed factor
"""

import sys

from tpu_lm.errors import exit_with


def main() -> None:
  verb = sys.argv[1] if len(sys.argv) > 1 else ""
  if verb == "train":  # before anything slow: see tpu_lm/main.py
    from tpu_lm.training import preemption

    preemption.early_watch()
  from tpu_lm import cli

  if verb in ("-h", "--help", "help"):
    print(__doc__.strip())
    return
  if verb not in cli.VERBS:
    exit_with(f"{'unknown command ' + repr(verb) if verb else 'no command given'}: use one of"
              f" {', '.join(cli.VERBS)} (tpu-lm VERB --help lists a command's flags).")
  sys.argv = [f"tpu-lm {verb}", *sys.argv[2:]]
  cli.start(verb)
