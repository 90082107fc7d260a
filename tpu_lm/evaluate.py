"""python -m tpu_lm.evaluate (or tpu-lm eval): lm-evaluation-harness tasks on a run; the command is tpu_lm/cli/evaluate.py."""

if __name__ == "__main__":
  from tpu_lm import cli

  cli.start("eval")
