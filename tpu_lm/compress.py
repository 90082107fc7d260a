"""python -m tpu_lm.compress (or tpu-lm compress): quantize and prune a run; the command is tpu_lm/cli/compress.py."""

if __name__ == "__main__":
  from tpu_lm import cli

  cli.start("compress")
