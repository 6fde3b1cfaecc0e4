"""Atomic file writes: what is already at a path is never replaced by a partial file.

A write goes to ``PATH.tmp-<pid>`` beside ``PATH`` and is renamed over it only when complete (``os.replace`` is
atomic within one file system), so a process killed mid-write, a full disk or a quota leaves the previous file
intact and no temporary file behind. Callers decide what a failure means (a checkpoint: an error; a cache: a
warning); :func:`atomic_file` only cleans up and re-raises.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def user_path(path: str) -> str:
    """A path as the user wrote it, with a leading ``~`` or ``~user`` expanded, as a shell would: YAML configs,
    ``--opt=~/x`` and environment variables reach sagan unexpanded, and ``~/data`` was read as a folder named
    ``~`` in the current one (``output_root: ~/runs`` created one)."""
    return os.path.expanduser(path)


def tmp_path(path: Path) -> Path:
    """Where :func:`atomic_file` writes before the rename: ``PATH.tmp-<pid>`` (``sagan prepare`` names its
    temporary folder the same way)."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_file(path: str | os.PathLike, fsync: bool = False) -> Iterator[BinaryIO]:
    """Open a temporary file for writing ``path``; when the block ends without an exception, flush it (and fsync
    it when ``fsync``: durable across a power loss, as checkpoints need) and rename it over ``path``. On any
    exception the temporary file is removed and the exception propagates unchanged."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
