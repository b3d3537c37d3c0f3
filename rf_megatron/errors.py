"""The error a user's mistake becomes: one line naming the option or file, never a stack trace.

It lives at the bottom of the import graph (docs/architecture.md) so that every layer can raise it."""
import argparse
from typing import Optional


class ConfigError(ValueError):
    """A user configuration that cannot work. The message is one line naming the option."""


def first_line(exc: BaseException, limit: Optional[int] = 200) -> str:
    """What a one-line error quotes of an exception: its message's first line (cut at `limit` characters), or its
    type's name when it has no message."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are ConfigErrors: under a launcher every rank parses the same command line, and
    rank 0 alone says what is wrong, in one line (rf_megatron/entry_point.py), not a usage block per rank."""

    def error(self, message):
        raise ConfigError(f"{message} (--help lists the options)")
