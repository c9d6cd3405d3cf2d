"""`unicom prepare-gldv2` (placeholder until its issue lands)."""

from unicom_cli.errors import UsageError


def prepare_gldv2() -> None:
    """Not available yet."""
    raise UsageError("`unicom prepare-gldv2` is not available yet")
