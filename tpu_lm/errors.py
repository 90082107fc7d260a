"""The one exception type for mistakes a user can make and fix."""


class UserError(Exception):
  """A bad config value, path, dataset or checkpoint.

  The message is one sentence that names what was wrong and how to fix it;
  `main` prints it and exits with code 2, without a traceback.
  """
