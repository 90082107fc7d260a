"""Entry point: python -m tpu_lm.main --config=configs/base.py [--workdir=DIR] [--config.x=y]."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tpu_lm.errors import UserError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (Python).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; default ./workdirs/<config name>.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the full traceback of a user error.")
flags.mark_flags_as_required(["config"])


def _user_error(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr, flush=True)
  sys.exit(2)


def parse_flags(argv):
  """absl's parser, with its failures (bad file, unknown field, bad value) as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # A config file that raises comes back with its traceback in the message:
    # its first line names the flag, its last the error.
    lines = [l for l in str(e).splitlines() if l.strip()]
    _user_error(lines[0] + (f" {lines[-1].strip()}" if len(lines) > 1 else "") + ".")
  except (AttributeError, KeyError) as e:  # ml_collections: an override names no field
    bad = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    where = f" in {', '.join(bad)}" if bad else ""
    inner = e.args[0] if e.args else e
    text = inner.args[0] if isinstance(inner, KeyError) and inner.args else str(inner)
    name, *hint = str(text).splitlines()  # ml_collections adds 'Did you mean "x" ...?'
    hint = f" ({hint[0]})" if hint else ""
    _user_error(f"unknown config field {name}{where}{hint}: check the name against the config file.")


def default_workdir() -> str:
  name = os.path.splitext(os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"])))[0]
  return os.path.join("workdirs", name)  # e.g. ./workdirs/base


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}: every option is a --flag.")
  filename = config_flags.get_config_filename(flags.FLAGS["config"])
  if not os.path.isfile(filename):
    _user_error(f"config file {filename} does not exist: pass --config=configs/<name>.py.")
  try:
    config = _CONFIG.value
  except Exception as e:  # a config file is user code: any error in it is the user's to fix
    _user_error(f"config file {filename} failed to load ({str(e).strip().splitlines()[-1]}): fix it and rerun.")
  workdir = _WORKDIR.value
  if not workdir:
    workdir = default_workdir()
    print(f"no --workdir given: using {os.path.abspath(workdir)}", flush=True)
  logging.set_verbosity(logging.WARNING)  # absl's INFO lines (e.g. libtpu probing) are noise here
  from tpu_lm import train  # after flag parsing: --help stays fast

  try:
    train.train_and_evaluate(config, workdir)
  except UserError as e:
    if _DEBUG.value:
      raise
    _user_error(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
