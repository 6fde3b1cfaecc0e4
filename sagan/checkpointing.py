"""Checkpoints that survive preemption: atomic writes, safe loads, a save on SIGTERM / SIGUSR1.

* :class:`AtomicCheckpointIO` writes ``path.tmp-<pid>``, fsyncs it and renames it over ``path``, so a process killed
  mid-write (SIGKILL, a node failure) leaves the previous checkpoint intact; a full disk ends in one clear error with
  the previous checkpoint untouched. It loads with ``torch.load(weights_only=True)``: no pickled code runs.
* :class:`Checkpoint` is Lightning's ``ModelCheckpoint`` that never saves the state of a diverged run.
* :class:`Preemption` turns SIGUSR1 (SLURM's warning signal, outside Lightning's own SLURM auto-requeue) into the same
  graceful stop as SIGTERM: Lightning stops at the next step and ``Checkpoint`` saves ``last.ckpt`` on the way out.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from .errors import CheckpointError, SaganError


class DivergenceError(SaganError):
    """Non-finite losses or gradients: training stopped, the last good checkpoint left as it was."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Temp file + fsync + rename on save; ``weights_only=True`` with clear errors on load."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create checkpoint folder {str(path.parent)!r}: {e.strerror}") from None
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            what = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
            raise CheckpointError(
                f"could not write checkpoint {str(path)!r}: {what}. Any checkpoint already there is intact; free space "
                "(or choose another --output_root) and resume with --ckpt_path last"
            ) from None

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None) -> dict:
        """Always ``weights_only=True``, onto the CPU; Lightning moves weights and optimizer states to the device."""
        from .sampling import load_checkpoint

        return load_checkpoint(path)


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that saves on SIGTERM/SIGUSR1/errors (``save_on_exception``) except after divergence."""

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (DivergenceError, CheckpointError)):
            return  # keep the last good checkpoint untouched; a failing disk is not retried
        super().on_exception(trainer, pl_module, exception)


class Preemption(pl.Callback):
    """SIGUSR1 -> graceful stop with a checkpoint, like SIGTERM (unless Lightning's SLURM auto-requeue owns it)."""

    def __init__(self, signals: list[str] = ["SIGUSR1"]) -> None:  # noqa: B006 - jsonargparse default
        super().__init__()
        self.signals = signals
        self._previous: dict[int, Any] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_fabric.plugins.environments import SLURMEnvironment

        env = trainer._accelerator_connector.cluster_environment
        if isinstance(env, SLURMEnvironment) and env.auto_requeue:
            return  # Lightning saves an HPC checkpoint and requeues on SIGUSR1 itself
        connector = trainer._signal_connector

        def handler(signum: int, frame: Any) -> None:
            connector._sigterm_notifier_fn(signum, frame)  # the same path as SIGTERM: stop at the next step

        for name in self.signals:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, handler)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()
