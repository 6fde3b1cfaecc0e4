"""Callbacks that react to training events: fixed-noise sample grids and the end-of-run summary."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from torchvision.utils import save_image


class SampleGrid(pl.Callback):
    """Writes the EMA generator's fixed-noise grid to ``dirpath/step_XXXXXX.png`` every ``every_n_steps``
    iterations (generator steps) and once more when training ends; rank 0 only.

    Rows are classes for conditional models. The noise is a buffer of the module, so grids are comparable across
    steps and resumes.
    """

    def __init__(self, dirpath: str | None = None, every_n_steps: int = 500, ema: bool = True) -> None:
        super().__init__()
        self.dirpath = dirpath
        self.every_n_steps = every_n_steps
        self.ema = ema
        self.last_path: Path | None = None
        self._last_step = -1

    def _dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "samples"

    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        step = int(pl_module.g_steps)
        grid = pl_module.sample_grid(ema=self.ema)  # every rank runs G the same way; rank 0 writes
        self._last_step = step
        if not trainer.is_global_zero:
            return None
        out = self._dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"step_{step:06d}.png"
        save_image(grid, path)
        self.last_path = path.resolve()
        return path

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args, **kwargs) -> None:
        step = int(pl_module.g_steps)
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if int(pl_module.g_steps) != self._last_step:
            self.write(trainer, pl_module)


class RunSummary(pl.Callback):
    """Prints, at the end of training, the iterations done and where the last checkpoint and sample grid are."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ckpt = trainer.checkpoint_callback
        last_ckpt = getattr(ckpt, "last_model_path", "") if ckpt is not None else ""
        grids = [cb.last_path for cb in trainer.callbacks if isinstance(cb, SampleGrid) and cb.last_path]
        lines = [f"sagan: trained {pl_module.g_steps} iterations ({pl_module.d_steps} discriminator steps)"]
        if last_ckpt:
            lines.append(f"  checkpoint:  {last_ckpt}")
        if grids:
            lines.append(f"  sample grid: {grids[-1]}")
        if trainer.is_global_zero:
            print("\n".join(lines), flush=True)
