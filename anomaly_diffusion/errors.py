"""Errors the CLI turns into one line and exit code 1.

Everything a user can cause (bad files, bad options, bad checkpoints) raises an `AdiffError`
subclass with a message that names the file or option and the problem. Anything else is a bug
and keeps its traceback.
"""


class AdiffError(Exception):
    """Base class for user-facing errors: the message is shown as one line."""


class InputError(AdiffError):
    """A scan, mask, manifest or folder cannot be used (missing, corrupt, wrong shape, NaNs...)."""


class ConfigError(AdiffError):
    """A configuration file or override is invalid."""


class CheckpointError(AdiffError):
    """A model bundle is missing, unreadable, unsafe, or does not match its config."""


class OutputError(AdiffError):
    """An output cannot be written (not writable, or exists without --overwrite)."""


class TrackingError(AdiffError):
    """The MLflow tracking store cannot be reached or used."""


class NoSpaceError(OutputError):
    """A write failed for want of space (ENOSPC), quota (EDQUOT) or a read-only file system (EROFS)."""
