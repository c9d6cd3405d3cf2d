"""`unicom finetune` (placeholder until its issue lands)."""

from unicom_cli.errors import UsageError


def finetune() -> None:
    """Not available yet."""
    raise UsageError("`unicom finetune` is not available yet")
