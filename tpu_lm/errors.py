"""The one exception type for mistakes a user can make and fix, and how commands report it."""

import sys
from typing import NoReturn


class UserError(Exception):
  """A bad config value, path, dataset, checkpoint or request.

  The message is one sentence that names what was wrong and how to fix it;
  the commands print it and exit with code 2, without a traceback.
  """


def exit_with(message: str) -> NoReturn:
  """What every command does with a user error: one line on stderr, exit code 2."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)
