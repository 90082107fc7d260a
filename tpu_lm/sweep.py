"""python -m tpu_lm.sweep (or tpu-lm sweep): a hyperparameter sweep; the command is tpu_lm/cli/sweep.py."""

if __name__ == "__main__":
  from tpu_lm import cli

  cli.start("sweep")
