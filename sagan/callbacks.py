"""Callbacks that react to training events: sample grids, attention maps, in-loop FID, W&B dashboard set-up,
and the end-of-run summary. Everything that writes files or logs pictures does so on rank 0 only."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Timer
from torchvision.utils import save_image

from .checkpointing import naming_the_file, set_aside_previous_run
from .errors import ConfigError, SaganError, lower_batch, out_of_memory_advice
from .files import user_path


class _FreshFolder(pl.Callback):
    """A callback that writes files into a run's folder: in a fresh run (no ``ckpt_path``), the files another run
    left there (``--overwrite``) move to ``previous/`` at the first write, so that the folder holds this run's
    alone; a resumed run adds to its own."""

    _fresh_since: float | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fresh_since = time.time() if trainer.is_global_zero and trainer.ckpt_path is None else None

    def _ready(self, folder: Path, what: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if self._fresh_since is not None:
            set_aside_previous_run(folder, self._fresh_since, what)
            self._fresh_since = None


class SampleGrid(_FreshFolder):
    """Writes the EMA generator's fixed-noise grid to ``dirpath/step_XXXXXX.png`` every ``every_n_steps``
    iterations (generator steps) and once more when training ends; rank 0 only.

    Rows are classes for conditional models. The noise is a buffer of the module, so grids are comparable across
    steps and resumes. Another run's grids in the folder (``--overwrite``) move to ``previous/``.
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
        self._ready(out, "sample grids")
        path = out / f"step_{step:06d}.png"
        with naming_the_file(path):
            save_image(grid, path)
        self.last_path = path.resolve()
        rows = pl_module.sample_y.view(-1, pl_module.sample_nrow)[:, 0].tolist() if pl_module.conditional else None
        caption = f"iteration {step}" + (f", rows = classes {rows}" if rows else "")
        log_images(trainer, "samples/ema_grid" if self.ema else "samples/grid", [str(path)], [caption])
        return path

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args, **kwargs) -> None:
        step = int(pl_module.g_steps)
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if int(pl_module.g_steps) != self._last_step:
            self.write(trainer, pl_module)


def wandb_loggers(trainer: pl.Trainer) -> list[Any]:
    from pytorch_lightning.loggers import WandbLogger

    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def log_images(trainer: pl.Trainer, key: str, paths: list[str], captions: list[str]) -> None:
    """Send pictures (files already written) to every W&B logger, at the trainer's step; rank 0 only."""
    if not trainer.is_global_zero:
        return
    for lg in wandb_loggers(trainer):
        lg.log_image(key=key, images=paths, caption=captions, step=trainer.global_step)


class AttentionMaps(_FreshFolder):
    """Every ``every_n_steps`` iterations, draw the EMA generator's attention maps for the first ``num_images``
    images of the fixed sample noise (see :func:`sagan.visualize.attention_figure`) to
    ``dirpath/step_XXXXXX.png`` and log them to W&B as ``attention_maps/G``; rank 0 only. Another run's maps in the
    folder (``--overwrite``) move to ``previous/``."""

    def __init__(self, dirpath: str | None = None, every_n_steps: int = 0, num_images: int = 2,
                 query_points: int = 4) -> None:
        super().__init__()
        from .visualize import check_query_points

        check_query_points(query_points, "attention_maps.query_points")
        if num_images < 1:
            raise ConfigError(f"attention_maps.num_images must be >= 1 (images per figure), got {num_images}")
        self.dirpath, self.every_n_steps, self.num_images, self.query_points = dirpath, every_n_steps, num_images, query_points
        self._last_step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args, **kwargs) -> None:
        step = int(pl_module.g_steps)
        if self.every_n_steps <= 0 or step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        if len(pl_module.generator.attn) == 0:
            return
        g = pl_module.ema_generator()  # on every rank: its standing statistics may synchronise (SyncBatchNorm)
        if not trainer.is_global_zero:
            return
        from PIL import Image

        from .visualize import attention_figure, default_query_points

        n = min(self.num_images, len(pl_module.sample_z))
        idx = torch.linspace(0, len(pl_module.sample_z) - 1, n).round().long()
        z, y = pl_module.sample_z[idx], pl_module.sample_y[idx] if pl_module.conditional else None
        with torch.no_grad():
            imgs, maps = g(z, y, return_attention=True)
        points = default_query_points(self.query_points)
        figs = [attention_figure(imgs[i].cpu(), {r: m[i].cpu() for r, m in maps.items()}, points) for i in range(n)]
        width = max(f.width for f in figs)
        sheet = Image.new("RGB", (width, sum(f.height for f in figs)), (30, 30, 30))
        y0 = 0
        for f in figs:
            sheet.paste(f, (0, y0))
            y0 += f.height
        out = Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "attention"
        self._ready(out, "attention maps")
        path = out / f"step_{step:06d}.png"
        with naming_the_file(path):
            sheet.save(path)
        log_images(trainer, "attention_maps/G", [str(path)],
                   [f"iteration {step}: per image, rows = attention layers, panels = query points"])


def git_commit() -> str:
    """The commit of the code that runs (with '-dirty' for uncommitted changes), or 'unknown'."""
    repo = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class WandbDashboard(pl.Callback):
    """Sets up the W&B run at fit start (rank 0): summaries of the validation metrics (min FID and KID, max IS),
    the code version, and the step axes; records the W&B run's id in every checkpoint (``wandb_run_id``), so that
    a resume continues the same W&B run (see ``SAGANCLI._configure_wandb``). No-op without a ``WandbLogger``."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        ids = [lg.version for lg in wandb_loggers(trainer) if lg.version]
        if ids:
            checkpoint["wandb_run_id"] = ids[0]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for lg in wandb_loggers(trainer):
            exp = lg.experiment
            exp.define_metric("trainer/global_step")
            exp.define_metric("*", step_metric="trainer/global_step", step_sync=True)
            for key, summary in (("val/fid", "min"), ("val/kid", "min"), ("val/fid_best", "min"), ("val/isc", "max"),
                                 ("val/precision", "max"), ("val/recall", "max"), ("val/spread", "max"),
                                 ("val/spread_min", "max"), ("val/ndb", "min"), ("val/jsd", "min")):
                exp.define_metric(key, step_metric="trainer/global_step", summary=summary)
            exp.define_metric("train/iteration", step_metric="trainer/global_step", summary="max")
            exp.config.update({"git_commit": git_commit(), "model_class": type(pl_module).__name__},
                              allow_val_change=True)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


class RunSummary(pl.Callback):
    """Prints, at the end of training, the iterations done (and whether ``trainer.max_time`` ended them before
    ``trainer.max_steps``) and where the last checkpoint and sample grid are. A resumed run also says how many
    iterations were its own, and one resumed at or past ``trainer.max_steps`` says that it had nothing to do."""

    def __init__(self) -> None:
        self.start_iteration: int | None = None  # set when training starts (after a resume has restored counters)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start_iteration = pl_module.g_steps

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ckpt = trainer.checkpoint_callback
        last_ckpt = getattr(ckpt, "last_model_path", "") if ckpt is not None else ""
        grids = [cb.last_path for cb in trainer.callbacks if isinstance(cb, SampleGrid) and cb.last_path]
        if self.start_iteration is None and 0 < trainer.max_steps <= trainer.global_step:
            # Lightning skips the whole fit loop: a run resumed with a budget it has already spent
            if trainer.is_global_zero:
                print(f"sagan: nothing to train: the checkpoint is at iteration {pl_module.g_steps} (optimizer step "
                      f"{trainer.global_step}) and trainer.max_steps is {trainer.max_steps}; raise "
                      "--trainer.max_steps (optimizer steps, n_dis + 1 per iteration) to train on", flush=True)
            return
        lines = [f"sagan: trained {_count(pl_module.g_steps, 'iteration')} "
                 f"({_count(pl_module.d_steps, 'discriminator step')})"]
        if self.start_iteration:
            lines[0] += f", {pl_module.g_steps - self.start_iteration} of them in this run"
        timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
        left = timer.time_remaining() if timer is not None else None  # None: no trainer.max_time
        if left is not None and left <= 0 and not 0 < trainer.max_steps <= trainer.global_step:
            lines[0] += f"; stopped by trainer.max_time ({timer.time_elapsed() + left:.0f} s of training)"
            if trainer.max_steps > 0:
                lines[0] += f" before trainer.max_steps ({trainer.max_steps})"
        if last_ckpt:
            lines.append(f"  checkpoint:  {last_ckpt}")
        for cb in trainer.callbacks:
            if isinstance(cb, FIDEvaluation) and cb.best_fid is not None:
                lines.append(f"  best FID:    {cb.best_fid:.4g} at iteration {cb.best_step} "
                             f"({cb._best_path(trainer).resolve()})")
        if grids:
            lines.append(f"  sample grid: {grids[-1]}")
        if trainer.is_global_zero:
            print("\n".join(lines), flush=True)


class FIDEvaluation(pl.Callback):
    """FID, precision/recall and per-class spread (optionally IS / KID) of the EMA generator every
    ``every_n_steps`` iterations, through torch-fidelity (see :class:`sagan.metrics.Evaluator`).

    Reference statistics of the training data are prepared once, when fit starts (loaded from the on-disk cache
    or extracted with a progress bar), never in the middle of training. Under DDP every rank generates and
    extracts its share of the samples and every rank gets the same numbers, so no rank waits inside a collective
    while another computes. Logged as ``val/fid``, ``val/precision``, ``val/recall``, ``val/spread``,
    ``val/spread_min``, ``val/ndb`` and ``val/jsd`` (bins of the real features that the samples fill or leave
    empty: mode dropping without labels), and ``val/isc``, ``val/kid`` when asked, with the best FID so far as
    ``val/fid_best``; when FID improves the full training state is saved as ``best.ckpt`` next to ``last.ckpt``.

    Args:
        every_n_steps: iterations between evaluations (0 = never).
        num_samples: generated images per evaluation.
        metrics: subset of fid, isc, kid, prc (precision/recall); the spread and the bins (ndb, jsd) are
            reported with any of fid/kid/prc.
        feature_extractor: 'auto' (digits-mlp for the digits set, else inception-v3-compat) or a torch-fidelity name.
        weights_path: feature-extractor weights file (else $SAGAN_INCEPTION_WEIGHTS, torch hub's cache, download).
        fid_layer: feature layer for FID/KID/PR (None = the extractor's default, 2048 for Inception).
        ref_split: split of the training data set used as reference.
        cache_root: folder of cached reference statistics (None = torch-fidelity's default).
        batch_size: generation / feature batch size (per process).
        seed: seed of the evaluation latents and labels (the same every evaluation).
        dirpath: where best.ckpt goes (None = the checkpoint callback's folder).
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        num_samples: int = 5000,
        metrics: list[str] = ["fid", "prc"],  # noqa: B006 - jsonargparse wants a plain default
        feature_extractor: str = "auto",
        weights_path: str | None = None,
        fid_layer: str | None = None,
        ref_split: str = "train",
        cache_root: str | None = None,
        batch_size: int = 100,
        seed: int = 0,
        dirpath: str | None = None,
    ) -> None:
        super().__init__()
        if every_n_steps > 0:  # checked now, not at the first evaluation, which may be hours into the run
            from .metrics import MetricsError, parse_metrics

            try:
                parse_metrics(metrics)
            except MetricsError as e:
                raise ConfigError(f"fid.metrics: {e}") from None
            if num_samples < 1 or batch_size < 1:
                raise ConfigError(f"fid.num_samples and fid.batch_size must be >= 1, got {num_samples} and "
                                  f"{batch_size}")
        self.every_n_steps, self.num_samples, self.metrics = every_n_steps, num_samples, list(metrics)
        weights_path, cache_root = (user_path(p) if p else p for p in (weights_path, cache_root))
        self.feature_extractor, self.weights_path, self.fid_layer = feature_extractor, weights_path, fid_layer
        self.ref_split, self.cache_root, self.batch_size, self.seed = ref_split, cache_root, batch_size, seed
        self.dirpath = dirpath
        self.best_fid: float | None = None
        self.best_step: int | None = None
        self._last_step = -1
        self._evaluator = None
        self._per_class: dict[str, float] = {}  # the last evaluation's spread by class name (console line)

    @property
    def enabled(self) -> bool:
        return self.every_n_steps > 0

    def _feature_name(self, trainer: pl.Trainer) -> str:
        if self.feature_extractor != "auto":
            return self.feature_extractor
        from .features import DIGITS_FEATURE_EXTRACTOR
        from .metrics import INCEPTION

        dm = trainer.datamodule
        return DIGITS_FEATURE_EXTRACTOR if getattr(dm, "dataset", None) == "digits" else INCEPTION

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the feature extractor and the reference statistics now, before the first training step."""
        if not self.enabled:
            return
        from .metrics import Evaluator, parse_metrics, resolve_feature_extractor

        parse_metrics(self.metrics)
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "build_dataset"):
            raise SaganError("in-loop FID needs the sagan data module (its training data is the reference)")
        try:  # fail now, not hours into training, when the weights cannot be had
            spec = resolve_feature_extractor(self._feature_name(trainer), self.weights_path)
        except SaganError as e:
            raise type(e)(f"{e} (or turn in-loop FID off with --fid.every_n_steps 0)") from None
        self._evaluator = Evaluator(spec, self.metrics, self.fid_layer, device=pl_module.device,
                                    batch_size=self.batch_size, progress=trainer.is_global_zero)
        reference = dm.build_dataset(self.ref_split)
        # too few images for the metrics: say so now, before the reference is read (minutes on a CPU) and not at
        # the first evaluation, perhaps hours into the run
        self._evaluator.check_counts(
            {"generated": self.num_samples, "reference": len(reference)},
            advice={"generated": "raise --fid.num_samples to at least {dim}",
                    "reference": "train on at least {dim} images (the reference is the training set)"},
            layer_flag="--fid.fid_layer", allow_flag=None)
        with out_of_memory_advice("in the in-loop evaluation's reference features", self._memory_fix()):
            self._evaluator.load_reference(
                reference, num_classes=dm.num_classes,
                cache_name=dm.reference_cache_name(self.ref_split, spec.weights_sha256), cache_root=self.cache_root,
                num_workers=dm.workers(trainer.world_size) if hasattr(dm, "workers") else 0,  # None: automatic
            )

    def _memory_fix(self) -> str:
        return lower_batch("--fid.batch_size", self.batch_size)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """The metrics of the EMA generator; every rank takes part and gets the same values."""
        from .diversity import spread_by_class

        g = pl_module.ema_generator()
        res = self._evaluator.generator(g, self.num_samples, seed=self.seed)
        self._per_class = spread_by_class(res.spread_per_class, getattr(trainer.datamodule, "classes", None) or [])
        return trainer.strategy.broadcast(res.values, src=0)  # equal already; rank 0's decides best.ckpt everywhere

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args, **kwargs) -> None:
        step = int(pl_module.g_steps)
        if not self.enabled or step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._run(trainer, pl_module, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = int(pl_module.g_steps)
        if self.enabled and step > 0 and step != self._last_step:
            self._run(trainer, pl_module, step)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        self._last_step = step
        with out_of_memory_advice(f"in the in-loop evaluation at iteration {step}", self._memory_fix()):
            values = self.evaluate(trainer, pl_module)
        metrics = {f"val/{k}": v for k, v in values.items()}
        improved = "fid" in values and (self.best_fid is None or values["fid"] < self.best_fid)
        if improved:
            self.best_fid, self.best_step = values["fid"], step
        if self.best_fid is not None:
            metrics["val/fid_best"] = self.best_fid
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        for k, v in metrics.items():
            trainer.callback_metrics[k] = torch.tensor(v)
        if trainer.is_global_zero:
            from .diversity import least_varied

            print(f"[iteration {step}] " + "  ".join(f"{k}={v:.4g}" for k, v in metrics.items())
                  + (f"  least varied: {least_varied(self._per_class)}" if self._per_class else ""), flush=True)
        if improved:
            trainer.save_checkpoint(str(self._best_path(trainer)), weights_only=False)  # collective: all ranks

    def _best_path(self, trainer: pl.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath) / "best.ckpt"
        ckpt = trainer.checkpoint_callback
        base = Path(ckpt.dirpath) if ckpt is not None and ckpt.dirpath else Path(trainer.default_root_dir) / "checkpoints"
        return base / "best.ckpt"

    def state_dict(self) -> dict:
        return {"best_fid": self.best_fid, "best_step": self.best_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best_fid = state_dict.get("best_fid")
        self.best_step = state_dict.get("best_step")


class LoaderMonitor(pl.Callback):
    """Measures whether the data loader or the model is the bottleneck: the time between the end of one training
    batch and the start of the next (waiting for data) against the time of the batch itself. After
    ``warmup + window`` batches it logs ``train/data_wait_fraction`` (median wait / (median wait + median step))
    and, when the loader holds training back by more than ``threshold`` on a folder or CIFAR-10, prints one line
    suggesting ``sagan prepare``. Rank 0 reports; nothing is measured after the window."""

    def __init__(self, warmup: int = 5, window: int = 50, threshold: float = 0.25) -> None:
        super().__init__()
        self.warmup, self.window, self.threshold = warmup, window, threshold
        self.waits: list[float] = []
        self.steps: list[float] = []
        self._end: float | None = None
        self._start: float | None = None
        self._batches = 0
        self.fraction: float | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args, **kwargs) -> None:
        import time

        self._start = time.perf_counter()
        if self._end is not None and self.fraction is None and self._batches >= self.warmup:
            self.waits.append(self._start - self._end)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args, **kwargs) -> None:
        import statistics
        import time

        self._end = time.perf_counter()
        self._batches += 1
        if self.fraction is not None or self._start is None:
            return
        if self._batches > self.warmup:
            self.steps.append(self._end - self._start)
        if len(self.waits) < self.window:
            return
        wait, step = statistics.median(self.waits), statistics.median(self.steps)
        self.fraction = wait / max(wait + step, 1e-12)
        for logger in trainer.loggers:
            logger.log_metrics({"train/data_wait_fraction": self.fraction}, step=trainer.global_step)
        dm = trainer.datamodule
        kind = getattr(dm, "dataset", None)
        if trainer.is_global_zero and self.fraction > self.threshold and kind in ("folder", "cifar10"):
            batch = getattr(dm, "batch_size", 0)
            root = getattr(dm, "root", "SRC")
            res = getattr(dm, "resolution", "R")
            print(f"sagan: the data loader, not the model, is the bottleneck: {100 * self.fraction:.0f}% of the "
                  f"time goes to waiting for batches ({batch / max(wait + step, 1e-12):.0f} images/s per process). "
                  f"Prepare the data once: `sagan prepare --source {root} --out {root}-{res} --resolution {res}`, "
                  f"then train with --data.dataset prepared --data.root {root}-{res} (or raise data.num_workers)",
                  flush=True)


class FastMath(pl.Callback):
    """Process-wide numeric switches that Lightning's Trainer has no flag for, set when fitting starts:
    ``matmul_precision`` is ``torch.set_float32_matmul_precision`` ('highest' = true float32; 'high' = TF32 tensor
    cores on Ampere and newer GPUs for float32 matmuls, and TF32 for cuDNN convolutions too); ``cudnn_benchmark``
    lets cuDNN pick the fastest convolution algorithm for the (fixed) shapes of a GAN step. Used by
    ``configs/trainer/gpu.yaml``; without CUDA only the matmul precision applies (the CPU ignores it)."""

    def __init__(self, matmul_precision: str = "highest", cudnn_benchmark: bool = False) -> None:
        super().__init__()
        if matmul_precision not in ("highest", "high", "medium"):
            raise SaganError(f"fast_math.matmul_precision must be 'highest', 'high' or 'medium', got "
                             f"{matmul_precision!r}")
        self.matmul_precision, self.cudnn_benchmark = matmul_precision, cudnn_benchmark

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        torch.set_float32_matmul_precision(self.matmul_precision)
        torch.backends.cudnn.allow_tf32 = self.matmul_precision != "highest"
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
