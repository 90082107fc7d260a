"""The commands: one module per verb (train, generate, serve, convert, compress,
inspect, audit, sweep, eval, codebench, speed), started the same way. `tpu-lm VERB --flags` (the console
script, app.py) and `python -m tpu_lm.<command>` (the modules beside this package)
both come here.

What every command shares, written once: the environment set before JAX or
TensorFlow loads (libtpu quiet where there is no TPU, TensorFlow's log level), absl's
flag parsing with its failures as one line, `--debug`, the check for stray
arguments, and a user error as one line on stderr with exit code 2 (a traceback
only with --debug).
"""

import contextlib
import importlib
import os
import re
import sys
import traceback

from absl import flags

from tpu_lm.errors import UserError, exit_with

# verb -> its module in this package (`inspect` is inspection.py: no module here may
# carry a standard-library name, or running a file of the folder by path shadows it).
VERBS = {"train": "train", "generate": "generate", "serve": "serve", "convert": "convert", "compress": "compress",
         "inspect": "inspection", "audit": "audit", "sweep": "sweep", "eval": "evaluate",
         "codebench": "codebench", "speed": "speed"}

DEBUG = flags.DEFINE_bool("debug", False, "Show the full traceback of a user error.")


def start(verb: str) -> None:
  """Runs command `verb` with the process's arguments: the environment first (before
  any module that loads JAX or TensorFlow), then its flags, then its body."""
  from absl import app

  from tpu_lm.parallel import libtpu_env

  libtpu_env.quiet_where_no_tpu()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  module = importlib.import_module(f"tpu_lm.cli.{VERBS[verb]}")
  app.run(command(module.body, getattr(module, "USAGE", "every option is a --flag.")), flags_parser=parse_flags)


_CHECKED: dict[str, str] = {}  # flag name -> the requirement check_flag registered for it


def check_flag(holder, ok, requirement: str) -> None:
  """`ok(value)` must hold for the flag `holder` (from DEFINE_*; None, unset, passes),
  else '--name=value is invalid: <requirement>.': the rule sits beside the flag's
  definition, its one home."""
  _CHECKED[holder.name] = requirement
  flags.register_validator(holder.name, lambda v: v is None or ok(v), message=requirement)


def at_least(holder, low) -> None:
  check_flag(holder, lambda v: v >= low, f"it must be at least {low}")


def positive(holder) -> None:
  check_flag(holder, lambda v: v > 0, "it must be positive")


def command(body, usage: str = "every option is a --flag."):
  """absl's main for a command whose work is `body()`: no stray arguments, absl's
  INFO/WARNING lines off (libtpu probing, Orbax's read-only notes, TFDS builder
  configs), a UserError as one line and exit code 2."""
  from absl import app, logging

  def main(argv) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}: {usage}")
    logging.set_verbosity(logging.ERROR)
    with user_errors(DEBUG.value):
      body()

  return main


def parse_flags(argv):
  """absl's parser, with its failures (bad file, unknown field, bad value, a config
  file that raises while it loads) as one line and exit code 2."""
  _importable_configs(argv)
  try:
    return flags.FLAGS(argv)
  except Exception as e:
    exit_with(_one_line(e, argv))


def _importable_configs(argv) -> None:
  """A config file in a package (configs/gpt2_124m.py does `from configs import at_scale`)
  loads from any working directory: the folder above its package goes on sys.path."""
  config_file = _config_file(argv)
  if config_file is None:
    return
  package = os.path.dirname(config_file)
  if os.path.isfile(os.path.join(package, "__init__.py")) and os.path.dirname(package) not in sys.path:
    sys.path.insert(0, os.path.dirname(package))


def missing_config(filename: str) -> str:
  """The line for a --config file that is not there."""
  return (f"config file {filename} does not exist (relative paths start at {os.getcwd()}): pass"
          " --config=configs/<name>.py from the repository root, or the config file's full path.")


@contextlib.contextmanager
def user_errors(debug: bool):
  """A command's body: a UserError inside becomes one line and exit code 2 (with
  --debug, the traceback)."""
  try:
    yield
  except UserError as e:
    if debug:
      raise
    exit_with(str(e))


def _one_line(e: Exception, argv) -> str:
  config_file = _config_file(argv)
  if config_file and _raised_in(e, config_file):  # a config file is user code
    return _config_failure(e, config_file)
  if isinstance(e, flags.UnrecognizedFlagError) and config_file:
    field = _config_field(e.flagname)
    if field:  # --num_train_steps=5 for --config.num_train_steps=5 (absl would suggest another flag)
      return f"unknown flag --{e.flagname}: config fields are set as --config.{field}=VALUE."
  if isinstance(e, flags.IllegalFlagValueError):
    checked = re.fullmatch(r"flag --([\w.]+)=(.*?): (.*)", str(e).splitlines()[0])
    if checked and _CHECKED.get(checked[1]) == checked[3]:  # the rule failed (not the value's parsing)
      return f"--{checked[1]}={checked[2]} is invalid: {checked[3]}."
  if isinstance(e, flags.Error):
    lines = [l for l in str(e).splitlines() if l.strip()]  # first line names the flag, last the error
    return lines[0] + (f" {lines[-1].strip()}" if len(lines) > 1 else "") + "."
  if isinstance(e, (AttributeError, KeyError)):  # ml_collections: an override names no field
    bad = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    where = f" in {', '.join(bad)}" if bad else ""
    inner = e.args[0] if e.args else e
    text = inner.args[0] if isinstance(inner, KeyError) and inner.args else str(inner)
    name, *hint = str(text).splitlines()  # ml_collections adds 'Did you mean "x" ...?'
    hint = f" ({hint[0]})" if hint else ""
    return f"unknown config field {name}{where}{hint}: check the name against the config file."
  raise e


def _config_field(name: str) -> str | None:
  """The config field a bare flag name means ('num_train_steps', 'learning_rate' ->
  'optim.learning_rate'), if exactly one field is so named."""
  from tpu_lm.config import defaults

  def fields(node, prefix=""):
    for key, value in node.items():
      if hasattr(value, "items"):
        yield from fields(value, f"{prefix}{key}.")
      else:
        yield f"{prefix}{key}"

  names = list(fields(defaults.get_config()))
  if name in names:
    return name
  matches = [f for f in names if f.rsplit(".", 1)[-1] == name]
  return matches[0] if len(matches) == 1 else None


def _config_file(argv) -> str | None:
  given = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  return os.path.abspath(given[-1].split(":")[0]) if given else None  # the last one wins, as in absl


def _raised_in(e: BaseException, path: str) -> bool:
  """Whether the error comes from running the config file (it is user code)."""
  while e is not None:
    if isinstance(e, SyntaxError) and e.filename and os.path.abspath(e.filename) == path:
      return True
    if any(os.path.abspath(f.filename) == path for f in traceback.extract_tb(e.__traceback__)):
      return True
    e = e.__cause__ or e.__context__
  return False


def _config_failure(e: BaseException, path: str) -> str:
  """'config file F failed to load at F:LINE (Error: message): fix it and rerun.'"""
  while not (isinstance(e, SyntaxError) or any(os.path.abspath(f.filename) == path for f in
                                                 traceback.extract_tb(e.__traceback__))):
    e = e.__cause__ or e.__context__
  if isinstance(e, SyntaxError):
    line, message = e.lineno, e.msg
  else:
    line = [f.lineno for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == path][-1]
    message = str(e).strip().splitlines()[-1] if str(e).strip() else ""
  return f"config file {path} failed to load at line {line} ({type(e).__name__}: {message}): fix it and rerun."
