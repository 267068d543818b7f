"""The one exception type for problems a user can fix (flags, configs, data, checkpoints)."""


class UserError(Exception):
  """Bad input from the user. `launch.py` prints the message as one line and exits with code 2.

  The message says what was given, what was expected and how to fix it.
  """
