"""A read-only folder for tests of outputs that cannot be written (import the fixture)."""

from __future__ import annotations

import os
import subprocess

import pytest


@pytest.fixture
def readonly_folder(tmp_path):
    """A real read-only file system (a tmpfs mounted ro, where we may mount), else a folder
    without write permission (as a user that is not root)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True).returncode == 0
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("root without mount: no way to make a folder read-only")
        folder.chmod(0o555)
    yield folder
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)
    else:
        folder.chmod(0o755)
