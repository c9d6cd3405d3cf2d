"""`unicom eval-knn` (placeholder until its issue lands)."""

from unicom_cli.errors import UsageError


def eval_knn() -> None:
    """Not available yet."""
    raise UsageError("`unicom eval-knn` is not available yet")
