"""python -m tpu_lm.audit (or tpu-lm audit): the memorization audit; the command is tpu_lm/cli/audit.py."""

if __name__ == "__main__":
  from tpu_lm import cli

  cli.start("audit")
