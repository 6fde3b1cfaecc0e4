"""Checkpoints that survive preemption: atomic writes, safe loads, a save on SIGTERM / SIGUSR1.

* :class:`AtomicCheckpointIO` writes ``path.tmp-<pid>``, fsyncs it and renames it over ``path``
  (:func:`sagan.files.atomic_file`), so a process killed
  mid-write (SIGKILL, a node failure) leaves the previous checkpoint intact; a full disk ends in one clear error with
  the previous checkpoint untouched. It loads with ``torch.load(weights_only=True)``: no pickled code runs.
* :class:`Checkpoint` is Lightning's ``ModelCheckpoint`` that never saves the state of a diverged run, and moves
  another run's checkpoints found in its folder (``--overwrite``) to ``previous/`` once it writes its own.
* :class:`Preemption` turns SIGUSR1 (SLURM's warning signal, outside Lightning's own SLURM auto-requeue) into the same
  graceful stop as SIGTERM: Lightning stops at the next step and ``Checkpoint`` saves ``last.ckpt`` on the way out.
* Resume state. :func:`seed_step` reseeds every random stream (torch CPU and CUDA, NumPy, Python) before each
  training batch from (run seed, rank, batches trained so far): the latents, labels, flips and augmentations of a
  step depend on nothing else, so a run resumed from any checkpoint draws exactly what an uninterrupted one would,
  for every rank and whatever the number of DataLoader workers, and no random state needs saving. In particular a
  checkpoint written on one rank alone (an error on that rank) needs no collective and cannot hang the job.
  :class:`TrainingCounters` holds the iteration counters that go into the checkpoint.
* :class:`DivergenceGuard` decides what a non-finite loss or gradient does (stop, or skip a bounded number of
  times), identically on every rank, and tells a mixed-precision (fp16) GradScaler overflow, which the scaler skips
  by itself, from divergence.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_info

from torch import Tensor

from .errors import CheckpointError, SaganError, is_disk_full, write_failure_reason
from .files import atomic_file


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
        try:
            with atomic_file(path, fsync=True) as f:
                torch.save(checkpoint, f)
        except (OSError, RuntimeError) as e:
            # torch's zip writer reports a failed write (a full disk, a quota, a file-size limit) as a RuntimeError
            # ("unexpected pos ...", "PytorchStreamWriter failed writing file ..."), without the errno
            failed_write = isinstance(e, OSError) or any(m in str(e) for m in _TORCH_WRITE_ERRORS)
            what = write_failure_reason(e, path.parent) if failed_write else ""
            if not failed_write:
                raise
            raise CheckpointError(
                f"could not write checkpoint {str(path)!r}: {what}. Any checkpoint already there is intact; free space "
                "(or choose another --output_root) and resume with --ckpt_path last"
            ) from None

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None) -> dict:
        """Always ``weights_only=True``, onto the CPU; Lightning moves weights and optimizer states to the device.
        The plain state dict that Lightning's fork launcher (``ddp_fork``, ``ddp_notebook``) hands from rank 0 to
        the main process after the fit is not a training checkpoint, and is returned as it is."""
        from .sampling import load_checkpoint

        if Path(path).name == ".temp.ckpt":  # _MultiProcessingLauncher's file, in a fresh temporary folder
            return torch.load(path, map_location="cpu", weights_only=True)
        return load_checkpoint(path)


_TORCH_WRITE_ERRORS = ("unexpected pos", "PytorchStreamWriter", "file write failed")


@contextmanager
def naming_the_file(path: Path) -> Iterator[None]:
    """A full disk met while writing ``path`` names ``path`` in its error (a failed ``write()`` carries no name)."""
    try:
        yield
    except OSError as e:
        if is_disk_full(e) and e.filename is None:
            e.filename = str(path)
        raise


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that saves on SIGTERM/SIGUSR1/errors (``save_on_exception``), except after divergence,
    and, with several processes, except on an error: a checkpoint is a collective (every rank takes part, and
    Lightning ends it with a barrier), and an error may have happened on one rank only, while the others wait in
    a training collective. That rank saves nothing and exits at once; Lightning's launcher (or torchrun) then ends
    the others, and the last periodic checkpoint stays as it was. SIGTERM / SIGUSR1 reach every rank at the same
    step (Lightning broadcasts rank 0's signal), so a preemption still saves under DDP."""

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        if isinstance(exception, (DivergenceError, CheckpointError)) or is_disk_full(exception):
            return  # keep the last good checkpoint untouched; a failing disk is not retried
        if trainer.world_size > 1 and not isinstance(exception, SIGTERMException):
            return  # possibly this rank alone: no collective here (see the class docstring)
        if not self._should_save_on_exception(trainer) or int(pl_module.g_steps) == 0:
            return  # nothing worth keeping before the first iteration ends (a batch too large for the GPU)
        candidates = self._monitor_candidates(trainer)  # ModelCheckpoint.on_exception, with a message a user reads
        self._save_checkpoint(trainer, self.format_checkpoint_name(metrics=candidates))
        self._save_last_checkpoint(trainer, candidates)
        what = ("interrupted (Ctrl-C)" if isinstance(exception, KeyboardInterrupt)
                else "stopped by SIGTERM" if isinstance(exception, SIGTERMException)
                else f"stopped by an error ({type(exception).__name__})")
        saved = self.last_model_path or "a checkpoint"
        rank_zero_info(f"sagan: {what} at iteration {int(pl_module.g_steps)}: saved {saved}; "
                       "resume with --ckpt_path last")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A fresh run (no ``ckpt_path``) in a folder that may hold another run's checkpoints (``--overwrite``):
        the files older than this run's start move to ``previous/`` when it writes its first checkpoint. Until then
        they stay where they are (a run that fails at its start loses nothing); after that, ``step=N.ckpt`` and
        ``best.ckpt`` in the folder are this run's alone. One generation is kept: an older ``previous/`` is replaced."""
        super().on_fit_start(trainer, pl_module)
        fresh = trainer.is_global_zero and trainer.ckpt_path is None and self.dirpath is not None
        self._fresh_since: float | None = time.time() if fresh else None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save the final state when training ends between two periodic checkpoints: at ``trainer.max_steps`` not a
        multiple of ``every_n_train_steps``, at ``trainer.max_time``, on an early stop. Lightning's ``save_last``
        only copies the latest periodic checkpoint, so ``last.ckpt`` would hold an earlier iteration than the run
        ended with (and than its final grid and in-loop FID show). Every rank calls this at the same point.
        Under ``trainer.fast_dev_run`` nothing is saved (Lightning's own ``save_last`` here would write one)."""
        if trainer.fast_dev_run:
            return
        if not self._should_skip_saving_checkpoint(trainer):  # skips a step already saved
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if getattr(self, "_fresh_since", None) is not None:
            set_aside_previous_run(Path(self.dirpath), self._fresh_since, "checkpoints")
            self._fresh_since = None
        super()._save_checkpoint(trainer, filepath)


def set_aside_previous_run(folder: Path, since: float, what: str) -> Path | None:
    """Move the files of ``folder`` older than ``since`` (another run's, left by ``--overwrite``) to
    ``folder/previous/``, replacing an older ``previous/``; by modification time, not by name, since this run may
    have written some already. Returns ``previous/`` if anything moved."""
    stale = [f for f in folder.iterdir() if f.is_file() and ".tmp-" not in f.name
             and f.stat().st_mtime < since] if folder.is_dir() else []
    if not stale:
        return None
    previous = folder / "previous"
    shutil.rmtree(previous, ignore_errors=True)
    previous.mkdir()
    for f in stale:
        os.replace(f, previous / f.name)
    rank_zero_info(f"the previous run's {what} in {folder} were moved to {previous}")
    return previous


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


# ------------------------------------------------------------------------------------------------ resume state
def step_seed(seed: int, rank: int, step: int) -> int:
    """A 64-bit seed that depends only on (run seed, rank, step), well mixed (NumPy's SeedSequence)."""
    return int(np.random.SeedSequence([seed % 2**63, rank, step]).generate_state(1, dtype=np.uint64)[0])


def seed_step(seed: int, rank: int, step: int) -> None:
    """Reseed torch (CPU and every CUDA device), NumPy and Python's ``random`` for training batch ``step``."""
    s = step_seed(seed, rank, step)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def run_seed() -> int:
    """The run's seed: ``seed_everything`` in the config (exported by Lightning as PL_GLOBAL_SEED), else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


@dataclass
class TrainingCounters:
    """Where training stands: optimizer updates of D and G, batches consumed (the data position), skipped steps."""

    d_steps: int = 0
    g_steps: int = 0
    batches_seen: int = 0
    skipped_steps: int = 0
    amp_skipped_steps: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self) | {"format": 2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in asdict(self):
            setattr(self, k, int(state.get(k, 0)))


# ------------------------------------------------------------------------------------------------ divergence
class DivergenceGuard:
    """What a non-finite loss or gradient does: ``policy='stop'`` raises :class:`DivergenceError` (the last good
    checkpoint stays as it was), ``'skip'`` skips the optimizer step, at most ``max_skips`` times.

    Under fp16 mixed precision the GradScaler multiplies the loss before backward, so an overflow to inf in the
    scaled gradients is expected now and then: the scaler skips that step and lowers its scale by itself. Such a
    step is let through to the scaler (and counted apart) as long as the loss itself is finite; only a non-finite
    loss is divergence there.
    """

    def __init__(self, policy: str = "stop", max_skips: int = 10) -> None:
        if policy not in ("stop", "skip"):
            raise ValueError(f"nonfinite policy must be 'stop' or 'skip', got {policy!r}")
        self.policy, self.max_skips = policy, max_skips

    def check(self, trainer: pl.Trainer, counters: TrainingCounters, net: str, loss: Tensor, grad_norm: Tensor,
              where: str) -> bool:
        """Whether the optimizer step may run (for fp16: be handed to the GradScaler). Decided the same on every
        rank: one rank's NaN stops them all (every rank calls this at the same point of every step)."""
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        finite = torch.isfinite(loss) if scaled else torch.isfinite(loss) & torch.isfinite(grad_norm)
        bad = not bool(finite)  # the one host read per optimizer step (on a GPU: waits for the step's kernels)
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return True
        if self.policy == "skip" and counters.skipped_steps < self.max_skips:
            counters.skipped_steps += 1
            rank_zero_print(f"sagan: warning: non-finite {net} loss/gradient at {where}: step skipped "
                            f"({counters.skipped_steps} of at most {self.max_skips})")
            return False
        raise DivergenceError(
            f"training diverged: non-finite {net} loss ({float(loss.detach()):.4g}) or gradient norm "
            f"({float(grad_norm):.4g}) at {where}. Stopped before the update; the last good checkpoint is untouched. "
            "Resume from it with lower learning rates, or set model.nonfinite: skip to skip such steps"
        )


def rank_zero_print(msg: str) -> None:
    from pytorch_lightning.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        print(msg, flush=True)
