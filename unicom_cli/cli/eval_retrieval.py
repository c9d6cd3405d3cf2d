"""`unicom eval-retrieval` (placeholder until its issue lands)."""

from unicom_cli.errors import UsageError


def eval_retrieval() -> None:
    """Not available yet."""
    raise UsageError("`unicom eval-retrieval` is not available yet")
