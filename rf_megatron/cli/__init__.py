"""The commands: `rf-train`, `rf-train-deepspeed`, `rf-convert-to-hf`, `rf-convert-from-hf` (setup.py's console
scripts), also run from a checkout as pretrain/*.py and tools/convert_*.py."""
from __future__ import annotations

import sys
from typing import Callable, Tuple, Type


def run_converter(convert: Callable[[], object], output, user_errors: Tuple[Type[BaseException], ...]) -> int:
    """A converter's exit code: 0; 2 with one `error:` line for a user error; 1 with one line for a full or read-only
    output disk (anything else is a bug and keeps its traceback)."""
    from ..disk_space import conversion_problem

    try:
        convert()
    except user_errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BaseException as exc:  # torch DCP's errors are BaseExceptions
        problem = conversion_problem(exc, output)
        if problem is None:
            raise
        print(f"error: {problem}", file=sys.stderr)
        return 1
    return 0
