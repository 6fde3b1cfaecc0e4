"""Progress that a person can read in a terminal and in a log file.

In a terminal, progress bars (tqdm, Lightning's bar) redraw one line. When the output is not a terminal (CI,
``make demo > log``, SLURM's output file) a redrawn bar becomes megabytes of carriage returns, so there:

* :func:`progress` prints one plain line every ``every_s`` seconds (and at the end) instead of a bar;
* :class:`LineProgress` replaces Lightning's progress bar during training: one line per ``every_n_steps``
  iterations with the iteration, the losses, D's outputs and the throughput.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar


def interactive(stream: Any = None) -> bool:
    """Whether ``stream`` (default stderr, where bars go) is a terminal; SAGAN_PROGRESS=bar|lines forces it."""
    forced = os.environ.get("SAGAN_PROGRESS", "").lower()
    if forced in ("bar", "lines"):
        return forced == "bar"
    stream = stream if stream is not None else sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


class _Lines:
    """A tqdm look-alike that prints a line every ``every_s`` seconds and when closed."""

    def __init__(self, total: int | None, desc: str, unit: str, every_s: float, disable: bool) -> None:
        self.total, self.desc, self.unit, self.every_s, self.disable = total, desc, unit, every_s, disable
        self.n, self.start, self.last = 0, time.perf_counter(), time.perf_counter()
        self._printed = 0  # the count of the last line printed

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.perf_counter() - self.last >= self.every_s:
            self._print()

    def _print(self) -> None:
        self.last, self._printed = time.perf_counter(), self.n
        if self.disable:
            return
        rate = self.n / max(self.last - self.start, 1e-9)
        of = f"/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else ""
        print(f"{self.desc}: {self.n}{of} {self.unit}, {rate:.0f} {self.unit}/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.n and self.n != self._printed:  # the last line may have been printed at the last update
            self._print()

    def __enter__(self) -> _Lines:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:  # a failure prints its own message, not a progress line
            self.close()


def progress(total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False,
             every_s: float = 30.0) -> Any:
    """A tqdm bar in a terminal, else a line every ``every_s`` seconds; use as a context manager with update()."""
    if interactive():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=False)
    return _Lines(total, desc, unit, every_s, disable)


def track(items: Any, total: int | None = None, **kw: Any) -> Iterator[Any]:
    """Iterate over ``items`` with :func:`progress`."""
    with progress(total if total is not None else len(items), **kw) as bar:
        for item in items:
            yield item
            bar.update(1)


class LineProgress(ProgressBar):
    """Lightning progress for logs: one line every ``every_n_steps`` iterations (generator steps), rank 0 only."""

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._t0: float | None = None
        self._last_step = -1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()
        self._start_step = int(getattr(pl_module, "g_steps", 0))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        step = int(getattr(pl_module, "g_steps", trainer.global_step))
        if not self._enabled or not trainer.is_global_zero or step == self._last_step or step == 0 \
                or step % self.every_n_steps:
            return
        self._last_step = step
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/") and v.numel() == 1}
        parts = [f"{k[6:]}={m[k]:.3f}" for k in ("train/loss_d", "train/loss_g", "train/d_real", "train/d_fake")
                 if k in m]
        elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
        its = (step - self._start_step) / max(elapsed, 1e-9)
        total = trainer.max_steps // (getattr(pl_module, "n_dis", 1) + 1) if trainer.max_steps > 0 else None
        of = f"/{total}" if total else ""
        print(f"[iteration {step}{of}] " + " ".join(parts) + f"  {its:.2f} it/s, {elapsed:.0f} s", flush=True)
