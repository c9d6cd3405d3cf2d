"""`unicom demo` (placeholder until its issue lands)."""

from unicom_cli.errors import UsageError


def demo() -> None:
    """Not available yet."""
    raise UsageError("`unicom demo` is not available yet")
