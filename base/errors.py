"""User-facing errors.

Every mistake a user can make (a wrong path, an unsupported architecture, an impossible sparsity,
a corrupt file) raises :class:`SurgeonError` with a one-line message that names the problem. The
CLI prints that line and exits with code 2, without a traceback; anything else is a bug.
"""


class SurgeonError(Exception):
    """A problem with the user's input, reported as one line (CLI exit code 2)."""


def check_choice(option: str, value: str, allowed: tuple[str, ...]) -> None:
    """Refuse ``value`` for ``option`` unless it is one of ``allowed`` (one line naming them)."""
    if value not in allowed:
        raise SurgeonError(f"{option} must be one of {', '.join(allowed)}, got {value!r}")


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message (its type's name when there is none): what a
    one-line error quotes of a library's multi-line message.

    Example:
        >>> first_line(ValueError("\\n  bad header  \\nmore detail"))
        'bad header'
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
