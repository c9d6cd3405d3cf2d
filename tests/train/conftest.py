"""Fixtures shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def digits_small(tmp_path_factory) -> Path:
    """Real digits as an ImageFolder tree: 0-4 to train on, 5-9 to test, 12 images per class."""
    from unicom_cli.data.digits import write_digits_tree

    return write_digits_tree(tmp_path_factory.mktemp("digits"), size=32, limit_per_class=12).root
