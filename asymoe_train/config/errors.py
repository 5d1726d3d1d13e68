"""The error every config check raises."""


class ConfigError(ValueError):
    """A configuration mistake, reported as one line naming the key and the fix."""
