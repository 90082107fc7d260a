"""python -m tpu_lm.main --config=configs/base.py (or tpu-lm train): train; the command is
tpu_lm/cli/train.py."""

if __name__ == "__main__":
  # First thing, before the slow imports: from here on a stop signal either ends the
  # process cleanly (before training there is nothing to save) or saves the step in
  # flight (tpu_lm/training/preemption.py).
  from tpu_lm.training import preemption

  preemption.early_watch()

  from tpu_lm import cli

  cli.start("train")
