"""python -m tpu_lm.codebench (or tpu-lm codebench): the offline code benchmark's pass@k on a run; the command is tpu_lm/cli/codebench.py."""

if __name__ == "__main__":
  from tpu_lm import cli

  cli.start("codebench")
