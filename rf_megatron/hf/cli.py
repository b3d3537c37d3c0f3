"""What the Hugging Face CLIs (the converters, evaluate) set up: quiet libraries before transformers is imported, and
a --help that shows only the defaults worth showing."""
from __future__ import annotations

import argparse
import os
import warnings


def quiet() -> None:
    """No hub access, no progress bars, no library deprecation chatter (errors still surface)."""
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's `(default: ...)` where it tells something: not a flag's True/False, not a None (the help says what
    happens then), not after a help text that names its default itself."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)
