"""One kind of error for bad user input, and the wrapper that turns it into one line + exit 2."""
import os
import sys
from collections.abc import Callable


class UsageError(Exception):
    """Bad input from the user (a flag, a file, a model name). Printed as one line, exit code 2."""


def run_command(main: Callable[[], None]) -> None:
    """Run a command-line ``main``: ``UsageError`` -> ``error: ...`` on stderr and exit 2;
    Ctrl-C -> exit 130 (whatever was saved stays saved). Under torchrun only rank 0 says it."""
    speaks = os.environ.get("RANK", "0") == "0"
    try:
        main()
    except UsageError as error:
        if speaks:
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if speaks:
            print("interrupted", file=sys.stderr)
        sys.exit(130)
