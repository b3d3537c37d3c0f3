"""The error a user's mistake becomes: one line naming the option or file, never a stack trace.

It lives at the bottom of the import graph (docs/architecture.md) so that every layer can raise it."""


class ConfigError(ValueError):
    """A user configuration that cannot work. The message is one line naming the option."""
