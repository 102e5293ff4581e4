"""Errors caused by user input.

The command line prints any `UserInputError` as one line and exits with code 2,
so its message must name the invalid value and the fix.
"""


class UserInputError(Exception):
  """Invalid input from the user: a config value, a file or a data source."""


class ConfigError(UserInputError, ValueError):
  """A config value that is unknown, of the wrong type or out of range."""


class DataSourceError(UserInputError):
  """A dataset that cannot be found, read or built."""


class CheckpointFileError(UserInputError):
  """A weights file that is missing, truncated, corrupt or of another model."""
