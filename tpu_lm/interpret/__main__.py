"""python -m tpu_lm.interpret (or tpu-lm inspect): look inside a run; the command is
tpu_lm/cli/inspection.py."""

from tpu_lm import cli

cli.start("inspect")
