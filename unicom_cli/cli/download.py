"""`unicom download` (placeholder until its issue lands)."""

from unicom_cli.errors import UsageError


def download() -> None:
    """Not available yet."""
    raise UsageError("`unicom download` is not available yet")
