"""python -m tpu_lm.generate (or tpu-lm generate): sample from a run; the command is tpu_lm/cli/generate.py."""

if __name__ == "__main__":
  from tpu_lm import cli

  cli.start("generate")
