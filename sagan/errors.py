"""Errors a user can cause. The CLI prints these as one clear line (no traceback) and exits with status 2."""


class SaganError(Exception):
    """Base class: a problem with the user's input (config, data, checkpoint), with the fix in the message."""


class ConfigError(SaganError, ValueError):
    """An invalid configuration value."""


class DataError(SaganError):
    """Missing, empty or unreadable training data."""


class CheckpointError(SaganError):
    """A missing, corrupt or incompatible checkpoint."""
