"""Errors users see in one line."""


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""
