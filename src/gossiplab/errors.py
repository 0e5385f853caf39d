"""The error every layer raises for a configuration that cannot run (the config's own checks, the
plug-in importer, the assembly), defined below all of them."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message names every bad field and what is allowed."""
