"""User-facing errors: one message that names the problem and the fix."""


class BaldroError(Exception):
    """An error caused by the user's input; the CLI prints it as one line, without a traceback."""


def require(condition: bool, message: str) -> None:
    """Raise `BaldroError(message)` unless `condition` holds."""
    if not condition:
        raise BaldroError(message)
