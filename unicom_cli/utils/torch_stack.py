"""Whether the installed torch and torchvision work together: asked when a command dies of an
unexpected error (torch stays unimported until a command needs it, so `--help` and early errors
stay instant).

A torchvision built for another torch (pip mixing two indexes) fails at import with errors such as
"operator torchvision::nms does not exist"; that deserves one line with the repair, not a traceback.
"""

from __future__ import annotations

from importlib import metadata

from unicom_cli.errors import BrokenInstall

REPAIR = 'pip install --force-reinstall torch torchvision   (both from one index; see the README\'s quick start)'


def _installed(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "(not installed)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def broken_torch_stack() -> BrokenInstall | None:
    """The BrokenInstall to report (both versions and the repair) if torch or torchvision cannot be
    imported, else None."""
    try:
        import torch  # noqa: F401
    except Exception as exc:  # any failure to import is the install's, not the user's input
        return BrokenInstall(f"torch {_installed('torch')} cannot be imported ({_first_line(exc)}); "
                             f"repair the install: {REPAIR}")
    try:
        import torchvision  # noqa: F401
    except Exception as exc:
        return BrokenInstall(f"torchvision {_installed('torchvision')} does not work with torch "
                             f"{_installed('torch')} ({_first_line(exc)}); install a matching pair: "
                             f"{REPAIR}")
    return None
