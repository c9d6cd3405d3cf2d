"""The UnicomError family: every failure a user can fix, with the thing at fault and the fix.

This module imports nothing from the package so that any layer can raise these errors.
"""


class UnicomError(Exception):
    """Base of all errors the CLI reports as a one-line message instead of a traceback.

    ``exit_code`` follows the CLI convention: 2 for bad usage or bad input, 1 for failures.
    """

    exit_code = 1


class UsageError(UnicomError):
    """An option or argument the user gave cannot work."""

    exit_code = 2


class UnknownModel(UsageError):
    """A model name that is neither registered nor a readable JSON architecture file."""


class InputError(UsageError):
    """A file or folder the user pointed at is missing, unreadable or malformed."""


class DatasetLayout(InputError):
    """A benchmark dataset is not in the expected on-disk layout."""


class BadImage(UnicomError):
    """One image could not be decoded; pipelines catch it, skip the file and report it."""


class WeightsError(UnicomError):
    """Weights could not be downloaded, verified or loaded."""


class CheckpointMismatch(WeightsError):
    """A checkpoint whose keys or shapes do not fit the chosen architecture: a wrong pairing the
    user fixes by picking the matching model, so bad input (exit 2)."""

    exit_code = 2


class ChecksumMismatch(WeightsError):
    """A file's SHA-256 differs from the expected one."""


class DownloadError(WeightsError):
    """The weights server could not be reached or refused the request."""


class UnsafeCheckpoint(WeightsError):
    """A checkpoint contains pickled code, which we never execute."""


class DistributedError(UnicomError):
    """Launching, joining or running a process group failed."""


class OutputExists(UsageError):
    """A finished output would be overwritten without ``--overwrite``."""


class TrainingDiverged(UnicomError):
    """The training loss became NaN or infinite (finetune stops and names the step)."""


class DiskError(UnicomError):
    """The output folder is full, read-only or not writable (names the folder and the fix)."""


class OutputInUse(UnicomError):
    """Another unicom run holds the lock of this output; two runs on one output corrupt it."""


class NonFiniteFeatures(UnicomError):
    """Features contain NaN or infinite values (names the count and the first ids)."""


class ExportFailed(UnicomError):
    """Exporting a model failed, or the exported file does not reproduce PyTorch's embeddings."""


class BrokenInstall(UnicomError):
    """The Python environment itself cannot run unicom (torch and torchvision that do not
    belong together); the fix is a reinstall, named in the message."""


class UnsupportedModel(UsageError):
    """A hub model this toolkit refuses to run: pickled weights only, remote code, no pooled output."""
