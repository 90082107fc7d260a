"""Flag parsing shared by the commands (main, generate, serve)."""

from absl import flags

from tpu_lm.errors import exit_with


def parse_flags(argv):
  """absl's parser, with its failures (bad file, unknown field, bad value) as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # A config file that raises comes back with its traceback in the message:
    # its first line names the flag, its last the error.
    lines = [l for l in str(e).splitlines() if l.strip()]
    exit_with(lines[0] + (f" {lines[-1].strip()}" if len(lines) > 1 else "") + ".")
  except (AttributeError, KeyError) as e:  # ml_collections: an override names no field
    bad = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    where = f" in {', '.join(bad)}" if bad else ""
    inner = e.args[0] if e.args else e
    text = inner.args[0] if isinstance(inner, KeyError) and inner.args else str(inner)
    name, *hint = str(text).splitlines()  # ml_collections adds 'Did you mean "x" ...?'
    hint = f" ({hint[0]})" if hint else ""
    exit_with(f"unknown config field {name}{where}{hint}: check the name against the config file.")
