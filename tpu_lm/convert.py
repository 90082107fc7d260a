"""python -m tpu_lm.convert (or tpu-lm convert): Hugging Face import and export, GGUF export; the command is tpu_lm/cli/convert.py."""

if __name__ == "__main__":
  from tpu_lm import cli

  cli.start("convert")
