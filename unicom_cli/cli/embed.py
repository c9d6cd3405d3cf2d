"""`unicom embed` (placeholder until its issue lands)."""

from unicom_cli.errors import UsageError


def embed() -> None:
    """Not available yet."""
    raise UsageError("`unicom embed` is not available yet")
