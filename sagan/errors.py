"""Errors a user can cause. The CLI prints these as one clear line (no traceback) and exits with status 2."""

import errno
import shutil
import sys
from pathlib import Path


class SaganError(Exception):
    """Base class: a problem with the user's input (config, data, checkpoint), with the fix in the message."""


class ConfigError(SaganError, ValueError):
    """An invalid configuration value."""


class DataError(SaganError):
    """Missing, empty or unreadable training data."""


class CheckpointError(SaganError):
    """A missing, corrupt or incompatible checkpoint."""


class SaganWarning(UserWarning):
    """Something the user may want to change (a setting that does nothing, files left out); the CLI prints it as
    one line, ``sagan: warning: ...``, without the source location Python's default format adds."""


def is_disk_full(e: BaseException) -> bool:
    """An ``OSError`` for a full disk or an exhausted quota."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def _disk_full_words(e: OSError) -> str:
    return "the disk quota is exhausted" if e.errno == errno.EDQUOT else "the disk is full"


def disk_full_message(e: OSError, where: str) -> str:
    """One line for a full disk met while writing: the file when the error names it, else ``where``."""
    return f"could not write {str(e.filename or where)!r}: {_disk_full_words(e)}"


def disk_full_exit(prog: str, e: OSError, where: str, fix: str) -> int:
    """A command's answer to an ``OSError`` met while writing: a full disk is one line on stderr and exit status 2
    (``where`` names what was being written when the error does not); any other error is raised again."""
    if not is_disk_full(e):
        raise e
    print(f"{prog}: error: {disk_full_message(e, where)}: {fix}", file=sys.stderr)
    return 2


def write_failure_reason(e: BaseException, folder: Path) -> str:
    """The cause of a failed write in words: a full disk (by errno, or by the free space left, since torch's writer
    drops the errno), else the error's own last line."""
    if is_disk_full(e):
        return _disk_full_words(e)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < 1 << 20:
        return f"the disk is full ({free // 1024} KiB free on the device holding {str(folder)!r})"
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return f"the write failed ({str(e).strip().splitlines()[-1]})"
