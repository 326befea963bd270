"""One kind of error for bad user input, and the wrapper that turns it into one line + exit 2."""
import sys
from collections.abc import Callable


class UsageError(Exception):
    """Bad input from the user (a flag, a file, a model name). Printed as one line, exit code 2."""


def run_command(main: Callable[[], None]) -> None:
    """Run a command-line ``main``: ``UsageError`` -> ``error: ...`` on stderr and exit 2;
    Ctrl-C -> exit 130 (whatever was saved stays saved)."""
    try:
        main()
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
