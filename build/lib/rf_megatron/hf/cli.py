"""What the Hugging Face CLIs (the converters, evaluate) set up: quiet libraries before transformers is imported, and
a --help that shows only the defaults worth showing."""
from __future__ import annotations

import argparse
import os


def quiet() -> None:
    """No hub access, no progress bars, and the project's one warning policy (rf_megatron/quiet.py: known library
    noise is filtered, anything else still prints)."""
    from ..quiet import silence_known_warnings

    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(key, value)
    silence_known_warnings()


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's `(default: ...)` where it tells something: not a flag's True/False, not a None (the help says what
    happens then), not after a help text that names its default itself."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)
