"""What every command-line entry point does with a bad input: one line on stderr naming the problem and the fix,
exit status 2, never a stack trace."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

EXIT_BAD_INPUT = 2


@contextlib.contextmanager
def exit_on(*errors: type[BaseException]) -> Iterator[None]:
    """Turn `errors` raised inside the block into `error: <message>` and exit status 2."""
    try:
        yield
    except errors as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT) from None


def console_script(main: Callable[..., Any]) -> Callable[[], None]:
    """`main` as a console-script entry point: its return value (a result for Python callers) is not the exit
    status."""

    def entry() -> None:
        main()

    entry.__doc__ = f"Console-script entry point of {main.__module__}."
    return entry
