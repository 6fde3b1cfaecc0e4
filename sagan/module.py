"""The SAGAN LightningModule: hinge loss, TTUR, n_dis, EMA generator, fixed sample noise.

Training follows SAGAN (Zhang et al. 2019, arXiv 1805.08318) section 5: spectral norm in both networks, the
two time-scale update rule (Heusel et al. 2017; lr_D = 4e-4, lr_G = 1e-4, Adam betas (0, 0.9)), hinge loss.

Manual optimisation. Every batch is one discriminator step (real and fake images through D in one concatenated
forward); every ``n_dis``-th batch is followed by one generator step with fresh latents, after which the EMA copy of
G (``torch.optim.swa_utils.AveragedModel``) is updated. One *iteration* is one G step. Note that Lightning's
``trainer.global_step`` (and so ``trainer.max_steps``) counts optimizer steps: ``n_dis + 1`` per iteration.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.utils import make_grid

from .checkpointing import DivergenceError
from .errors import CheckpointError, ConfigError
from .layers import refresh_spectral_norm
from .losses import get_losses
from .models import Discriminator, Generator, attention_layers


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def _rng_state() -> dict[str, Any]:
    """Global random states (torch CPU and CUDA, NumPy, Python) as tensors and plain containers."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": _py_state(),
    }


def _py_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_py = state["python"]
    random.setstate((version, tuple(internal), gauss_py))


def _grad_norm(module: torch.nn.Module) -> Tensor:
    """Global L2 norm of a module's gradients (before the optimizer step)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads).detach() if grads else torch.zeros(())


class _WarmupEMA:
    """multi_avg_fn for ``AveragedModel``: EMA with decay ``min(decay, (1 + n) / (10 + n))`` (n = updates so far).

    The warm-up keeps the EMA close to G early in training, when a fixed 0.999 would average in the random init.
    """

    def __init__(self, decay: float, warmup: bool) -> None:
        self.decay, self.warmup = decay, warmup

    def __call__(self, ema_params: list[Tensor], params: list[Tensor], num_averaged: Tensor) -> None:
        decay = self.decay
        if self.warmup:
            n = float(num_averaged)
            decay = min(decay, (1.0 + n) / (10.0 + n))
        get_ema_multi_avg_fn(decay)(ema_params, params, num_averaged)


class SAGAN(pl.LightningModule):
    """Self-Attention GAN training.

    Args:
        resolution: image size (32, 64 or 128); linked from the data module by the CLI.
        img_channels: image channels (1 for grayscale, 3 for RGB); linked from the data module by the CLI.
        num_classes: number of classes of the data (0 = unlabelled); linked from the data module by the CLI.
        conditional: train class-conditionally (conditional BN in G, projection D) when the data has classes.
        z_dim: latent size.
        g_ch, d_ch: base channel widths of G and D.
        g_ch_mult, d_ch_mult: channel multipliers per stage (None = preset for the resolution, see ``models``).
        g_attn, d_attn: feature-map resolutions after which G / D have a self-attention block (None = preset).
        loss: 'hinge' (SAGAN) or 'nonsaturating'.
        n_dis: discriminator steps per generator step.
        lr_g, lr_d: Adam learning rates (TTUR).
        betas_g, betas_d: Adam betas.
        ema_decay: decay of the EMA generator; ``ema_warmup`` ramps it up as (1+n)/(10+n).
        sample_per_class: samples per class row in the fixed-noise grid (conditional models).
        sample_num: number of samples in the fixed-noise grid of unconditional models.
        sample_seed: seed of the fixed sample noise (stored in the checkpoint, so grids stay comparable on resume).
        nonfinite: what a non-finite loss or gradient norm does: 'stop' training with an error naming the step
            (the last good checkpoint stays as it was), or 'skip' that optimizer step, at most ``max_skips`` times.
        max_skips: how many non-finite steps 'skip' tolerates before stopping.
        channels_last: keep G, D and their inputs in channels-last memory format (on by default: the same numbers,
            1.16-1.24x faster training on the CPU, see BENCHMARKS.md). Mixed precision is the trainer's
            ``precision`` (e.g. ``bf16-mixed``: 2.3-2.5x on a bf16-capable CPU, not on by default because it changes
            the numerics of a recipe).
        compile: ``torch.compile`` the networks as used in the training steps (1.04x on the CPU after minutes of
            compiling; meant for long GPU runs).
    """

    def __init__(
        self,
        resolution: int = 32,
        img_channels: int = 3,
        num_classes: int = 0,
        conditional: bool = True,
        z_dim: int = 128,
        g_ch: int = 64,
        d_ch: int = 64,
        g_ch_mult: Sequence[int] | None = None,
        d_ch_mult: Sequence[int] | None = None,
        g_attn: Sequence[int] | None = None,
        d_attn: Sequence[int] | None = None,
        loss: Literal["hinge", "nonsaturating"] = "hinge",
        n_dis: int = 1,
        lr_g: float = 1e-4,
        lr_d: float = 4e-4,
        betas_g: tuple[float, float] = (0.0, 0.9),
        betas_d: tuple[float, float] = (0.0, 0.9),
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        sample_per_class: int = 10,
        sample_num: int = 64,
        sample_seed: int = 0,
        nonfinite: Literal["stop", "skip"] = "stop",
        max_skips: int = 10,
        channels_last: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if n_dis < 1:
            raise ConfigError(f"model.n_dis must be >= 1, got {n_dis}")
        if not 0.0 <= ema_decay < 1.0:
            raise ConfigError(f"model.ema_decay must be in [0, 1), got {ema_decay}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        n_cls = num_classes if conditional else 0
        self.num_classes = n_cls
        self.z_dim = z_dim
        self.n_dis = n_dis
        self.generator = Generator(resolution, z_dim, g_ch, g_ch_mult, g_attn, n_cls, img_channels)
        self.discriminator = Discriminator(resolution, d_ch, d_ch_mult, d_attn, n_cls, img_channels)
        self.g_ema = AveragedModel(self.generator, multi_avg_fn=_WarmupEMA(ema_decay, ema_warmup), use_buffers=False)
        self.g_ema.requires_grad_(False)
        self.d_loss_fn, self.g_loss_fn = get_losses(loss)
        self.d_steps = 0  # discriminator updates so far
        self.g_steps = 0  # generator updates (= iterations) so far
        self.batches_seen = 0  # training batches consumed (the data position, for exact resume)
        self.__dict__["_ddp"] = {}  # DDP wrappers of G and D (sagan.strategy), kept out of the state dict
        self.skipped_steps = 0  # optimizer steps skipped as non-finite
        self._last_step_time: float | None = None

        # Fixed sample noise, a persistent buffer: identical grids across steps and resumes.
        gen = torch.Generator().manual_seed(sample_seed)
        if n_cls > 0:
            rows = min(n_cls, 10)
            classes = torch.linspace(0, n_cls - 1, rows).round().long()
            sample_y = classes.repeat_interleave(sample_per_class)  # row r = class classes[r]
            self.sample_nrow = sample_per_class
        else:
            sample_y = torch.zeros(sample_num, dtype=torch.long)
            self.sample_nrow = max(1, int(sample_num**0.5))
        self.register_buffer("sample_z", torch.randn(len(sample_y), z_dim, generator=gen))
        self.register_buffer("sample_y", sample_y)

    # ----------------------------------------------------------------------------------------------- helpers
    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def set_ddp_wrappers(self, generator: torch.nn.Module | None, discriminator: torch.nn.Module | None) -> None:
        """Called by ``GANDDPStrategy``: the DDP wrappers to train G and D through (None: the plain modules)."""
        self.__dict__["_ddp"] = {"g": generator, "d": discriminator} if generator is not None else {}

    @property
    def g_train(self) -> torch.nn.Module:
        """G for its own training step: its DDP wrapper under ``GANDDPStrategy``, else G itself (compiled if asked)."""
        return self._fast("g", self.__dict__["_ddp"].get("g") or self.generator)

    @property
    def d_train(self) -> torch.nn.Module:
        """D for its own training step: its DDP wrapper under ``GANDDPStrategy``, else D itself (compiled if asked)."""
        return self._fast("d", self.__dict__["_ddp"].get("d") or self.discriminator)

    @property
    def d_frozen(self) -> torch.nn.Module:
        """D as used in G's step (parameters frozen, never its DDP wrapper)."""
        return self._fast("d_frozen", self.discriminator)

    def _fast(self, key: str, module: torch.nn.Module) -> torch.nn.Module:
        if not self.hparams.get("compile", False):
            return module
        cache = self.__dict__.setdefault("_compiled", {})
        if key not in cache or cache[key][0] is not module:
            cache[key] = (module, torch.compile(module))
        return cache[key][1]

    def on_train_start(self) -> None:
        if self.hparams.get("channels_last", False):
            for m in (self.generator, self.discriminator, self.g_ema):
                m.to(memory_format=torch.channels_last)

    def setup(self, stage: str) -> None:
        """Per-rank noise: rank r > 0 reseeds its random streams with (seed + r), so ranks draw different latents
        (rank 0 keeps the stream a single-process run would have). A resumed run then restores every rank's exact
        stream from the checkpoint."""
        if stage == "fit" and self.trainer.world_size > 1 and self.trainer.global_rank > 0:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) + self.trainer.global_rank
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)

    def on_fit_start(self) -> None:
        from pytorch_lightning.strategies import DDPStrategy

        from .strategy import GANDDPStrategy

        strategy = self.trainer.strategy
        if (isinstance(strategy, DDPStrategy) and not isinstance(strategy, GANDDPStrategy)
                and not strategy._ddp_kwargs.get("find_unused_parameters", False)):
            raise ConfigError(
                "one DDP wrapper around G and D needs find_unused_parameters=True (a D step never uses G): use "
                "--config configs/trainer/ddp.yaml (sagan.strategy.GANDDPStrategy, one wrapper per network), or "
                "--trainer.strategy ddp_find_unused_parameters_true"
            )

    def sample_latents(self, n: int) -> tuple[Tensor, Tensor | None]:
        """Random latents z ~ N(0, I) and, for conditional models, uniform class labels."""
        z = torch.randn(n, self.z_dim, device=self.device)
        y = torch.randint(0, self.num_classes, (n,), device=self.device) if self.conditional else None
        return z, y

    def ema_generator(self) -> Generator:
        """The EMA generator in eval mode, its spectral-norm vectors refreshed against the averaged weights."""
        g = self.g_ema.module
        g.eval()
        refresh_spectral_norm(g, n_iterations=1)
        return g

    @torch.no_grad()
    def sample_grid(self, ema: bool = True) -> Tensor:
        """The fixed-noise grid (C, H, W) in [0, 1]; rows are classes for conditional models."""
        g = self.ema_generator() if ema else self.generator
        was_training = g.training
        g.eval()
        imgs = [
            g(z, y if self.conditional else None)
            for z, y in zip(self.sample_z.split(100), self.sample_y.split(100), strict=True)
        ]
        g.train(was_training)
        return make_grid(torch.cat(imgs).float().cpu(), nrow=self.sample_nrow, normalize=True, value_range=(-1, 1))

    # ---------------------------------------------------------------------------------------------- training
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=hp.lr_g, betas=tuple(hp.betas_g))
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=hp.lr_d, betas=tuple(hp.betas_d))
        return [opt_g, opt_d]

    def d_step(self, x: Tensor, y: Tensor | None) -> dict[str, Tensor]:
        """One discriminator update on a real batch; G is only run forward (no gradients)."""
        _, opt_d = self.optimizers()
        b = x.shape[0]
        z, y_fake = self.sample_latents(b)
        with torch.no_grad():
            fake = self.generator(z, y_fake)
        labels = torch.cat([y, y_fake]) if self.conditional else None
        logits = self.d_train(torch.cat([x, fake]), labels)  # one forward for real and fake: (2B,)
        d_real, d_fake = logits[:b], logits[b:]
        loss_d = self.d_loss_fn(d_real, d_fake)
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(loss_d)
        grad_norm = _grad_norm(self.discriminator)
        if self._finite("discriminator", loss_d, grad_norm):
            opt_d.step()
        self.d_steps += 1
        return {"loss_d": loss_d.detach(), "d_real": d_real.detach().mean(), "d_fake": d_fake.detach().mean(),
                "grad_norm_d": grad_norm, "lr_d": torch.tensor(opt_d.param_groups[0]["lr"])}

    def g_step(self, batch_size: int) -> dict[str, Tensor]:
        """One generator update; D's parameters are frozen (toggled off) and receive no gradient."""
        opt_g, _ = self.optimizers()
        self.toggle_optimizer(opt_g)
        z, y_fake = self.sample_latents(batch_size)
        loss_g = self.g_loss_fn(self.d_frozen(self.g_train(z, y_fake), y_fake))  # frozen D, not its wrapper
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss_g)
        grad_norm = _grad_norm(self.generator)
        finite = self._finite("generator", loss_g, grad_norm)
        if finite:
            opt_g.step()
        self.untoggle_optimizer(opt_g)
        if finite:
            self.g_ema.update_parameters(self.generator)
        self.g_steps += 1
        return {"loss_g": loss_g.detach(), "grad_norm_g": grad_norm, "lr_g": torch.tensor(opt_g.param_groups[0]["lr"])}

    def _finite(self, net: str, loss: Tensor, grad_norm: Tensor) -> bool:
        """Whether this optimizer step may run; decided the same on every rank (one rank's NaN stops them all)."""
        bad = not bool(torch.isfinite(loss) and torch.isfinite(grad_norm))
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return True
        where = (f"iteration {self.g_steps} (optimizer step {self.trainer.global_step}, "
                 f"batch {self.batches_seen})")
        if self.hparams.nonfinite == "skip" and self.skipped_steps < self.hparams.max_skips:
            self.skipped_steps += 1
            self.print(f"sagan: warning: non-finite {net} loss/gradient at {where}: step skipped "
                       f"({self.skipped_steps} of at most {self.hparams.max_skips})")
            return False
        raise DivergenceError(
            f"training diverged: non-finite {net} loss ({float(loss.detach()):.4g}) or gradient norm ({float(grad_norm):.4g}) "
            f"at {where}. Stopped before the update; the last good checkpoint is untouched. Resume from it with "
            "lower learning rates, or set model.nonfinite: skip to skip such steps"
        )

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        self.batches_seen += 1
        x, y = batch[0], batch[1]
        if self.hparams.get("channels_last", False):
            x = x.contiguous(memory_format=torch.channels_last)
        if not self.conditional:
            y = None
        logs = self.d_step(x, y)
        if self.d_steps % self.n_dis == 0:
            logs.update(self.g_step(x.shape[0]))
        now = time.perf_counter()
        if self._last_step_time is not None:  # real images per second, all processes together
            logs["images_per_s"] = torch.tensor(x.shape[0] * self.trainer.world_size / (now - self._last_step_time))
        self._last_step_time = now
        bar = {"loss_d", "loss_g", "d_real", "d_fake"}
        self.log_dict({f"train/{k}": v for k, v in logs.items() if k in bar}, prog_bar=True, batch_size=x.shape[0])
        self.log_dict({f"train/{k}": v for k, v in logs.items() if k not in bar}, batch_size=x.shape[0])
        gammas = {f"attention/gamma_G{r}": m.gamma.detach() for r, m in attention_layers(self.generator).items()}
        gammas.update({f"attention/gamma_D{r}": m.gamma.detach() for r, m in attention_layers(self.discriminator).items()})
        self.log_dict(gammas, batch_size=x.shape[0])
        self.log("train/iteration", float(self.g_steps), batch_size=x.shape[0])

    # ------------------------------------------------------------------------------------------- checkpoints
    ARCHITECTURE_KEYS = ("resolution", "img_channels", "num_classes", "conditional", "z_dim", "g_ch", "d_ch",
                         "g_ch_mult", "d_ch_mult", "g_attn", "d_attn")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng = _rng_state()
        if self._trainer is not None and self.trainer.world_size > 1:  # every rank's stream (all ranks call this)
            rngs = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        checkpoint["sagan"] = {"d_steps": self.d_steps, "g_steps": self.g_steps, "batches_seen": self.batches_seen,
                               "skipped_steps": self.skipped_steps, "rng": rngs, "format": 1}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        hp = checkpoint.get("hyper_parameters", {})
        diff = {k: (hp.get(k), self.hparams.get(k)) for k in self.ARCHITECTURE_KEYS
                if k in hp and _norm(hp.get(k)) != _norm(self.hparams.get(k))}
        if diff:
            pretty = ", ".join(f"{k}={a!r} in the checkpoint vs {b!r} here" for k, (a, b) in diff.items())
            raise CheckpointError(
                f"the checkpoint is of another architecture ({pretty}): resume with the run's own config "
                "(its config.yaml), or start a fresh run"
            )
        state = checkpoint.get("sagan", {})
        self.d_steps = int(state.get("d_steps", 0))
        self.g_steps = int(state.get("g_steps", 0))
        self.batches_seen = int(state.get("batches_seen", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        rngs = state.get("rng") or []
        rank = self.trainer.global_rank if self._trainer is not None else 0
        if rngs and len(rngs) == (self.trainer.world_size if self._trainer is not None else 1):
            _set_rng_state(rngs[rank])  # exact continuation of this rank's random stream
