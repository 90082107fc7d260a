"""python -m tpu_lm.speed (or tpu-lm speed): this CPU's speed factor; the command is tpu_lm/cli/speed.py."""

if __name__ == "__main__":
  from tpu_lm import cli

  cli.start("speed")
