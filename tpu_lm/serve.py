"""python -m tpu_lm.serve (or tpu-lm serve): the OpenAI-compatible HTTP server; the command is tpu_lm/cli/serve.py."""

if __name__ == "__main__":
  from tpu_lm import cli

  cli.start("serve")
