"""The SAGAN LightningModule: hinge loss, TTUR, n_dis, EMA generator, fixed sample noise.

Training follows SAGAN (Zhang et al. 2019, arXiv 1805.08318) section 5: spectral norm in both networks, the
two time-scale update rule (Heusel et al. 2017; lr_D = 4e-4, lr_G = 1e-4, Adam betas (0, 0.9)), hinge loss.

Manual optimisation. Every batch is one discriminator step (real and fake images through D in one concatenated
forward); every ``n_dis``-th batch is followed by one generator step with fresh latents (or, with ``reuse_fakes``, on
the images the D step just drew), after which the EMA copy of G (``torch.optim.swa_utils.AveragedModel``) is
updated. One *iteration* is one G step. Note that Lightning's
``trainer.global_step`` (and so ``trainer.max_steps``) counts optimizer steps: ``n_dis + 1`` per iteration.

Options for small data sets: DiffAugment on every image D sees (``augment``) and LeCam regularisation of D
(``lecam_weight``). What is not GAN training lives elsewhere: resume state, per-step random streams and the
divergence policy in :mod:`sagan.checkpointing`, the DDP / compile plumbing in :mod:`sagan.strategy`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.utils import make_grid

from .augment import DiffAugment
from .checkpointing import DivergenceGuard, TrainingCounters, run_seed, seed_step
from .errors import CheckpointError, ConfigError, SaganWarning
from .layers import refresh_spectral_norm
from .losses import diversity_match_reg, get_losses, lecam_reg, mode_seeking_reg, same_class_distance
from .models import Discriminator, Generator, attention_layers, conditioning_strength
from .strategy import TrainingNetworks


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def _grad_norm(module: torch.nn.Module) -> Tensor:
    """Global L2 norm of a module's gradients (before the optimizer step)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads).detach() if grads else torch.zeros(())


class _WarmupEMA:
    """multi_avg_fn for ``AveragedModel``: EMA with decay ``min(decay, (1 + n) / (10 + n))`` (n = updates so far).

    The warm-up keeps the EMA close to G early in training, when a fixed 0.999 would average in the random init.
    :class:`EMAGenerator` hands it the count in host memory, so reading it never waits for a GPU.
    """

    def __init__(self, decay: float, warmup: bool, warmup_k: float = 10.0) -> None:
        self.decay, self.warmup, self.warmup_k = decay, warmup, warmup_k  # warmup_k: the 10 above

    def __call__(self, ema_params: list[Tensor], params: list[Tensor], num_averaged: Tensor) -> None:
        decay = self.decay
        if self.warmup:
            n = float(num_averaged)
            decay = min(decay, (1.0 + n) / (self.warmup_k + n))
        get_ema_multi_avg_fn(decay)(ema_params, params, num_averaged)


class EMAGenerator(AveragedModel):
    """The EMA copy of G: ``swa_utils.AveragedModel`` with the warm-up decay of :class:`_WarmupEMA`, whose update
    count ``n_averaged`` stays in host memory when the module moves to a GPU. AveragedModel reads the count at every
    update (``n_averaged == 0``, ``> 0``) and the warm-up needs it as a number; on a GPU each read would make the
    host wait for every kernel queued so far."""

    OWN_BUFFERS = ("._u", "._v")  # spectral-norm vectors: the EMA network's own after the first update (see SAGAN)

    def __init__(self, generator: torch.nn.Module, decay: float, warmup: bool) -> None:
        super().__init__(generator, multi_avg_fn=_WarmupEMA(decay, warmup), use_buffers=False)

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        """AveragedModel's update (first call copies, then ``multi_avg_fn``; buffers copied as with
        ``use_buffers=False``, except the spectral-norm vectors after the first call) with the count read on the
        host; AveragedModel itself would copy the count to the device, another wait for the GPU, before handing it
        to ``multi_avg_fn``."""
        ema, current = list(self.module.parameters()), [p.detach() for p in model.parameters()]
        first = int(self.n_averaged) == 0
        if first:
            torch._foreach_copy_(ema, current)
        else:
            self.multi_avg_fn(ema, current, self.n_averaged)
        pairs = [(b_ema, b) for (name, b_ema), b in zip(self.module.named_buffers(), model.buffers(), strict=True)
                 if first or not name.endswith(self.OWN_BUFFERS)]
        if pairs:
            torch._foreach_copy_([a for a, _ in pairs], [b for _, b in pairs])
        self.n_averaged += 1

    def _apply(self, fn: Any, recurse: bool = True) -> EMAGenerator:
        count = self.n_averaged
        super()._apply(fn, recurse)
        self._buffers["n_averaged"] = count  # .to(device) / .cuda() / .half() leave the host count where it is
        return self


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
        cbn_sn: spectrally normalised class embeddings in G's conditional BN (StudioGAN) instead of the official
            SAGAN code's per-class gain and bias initialised to 1 and 0 (default; see ``layers.ConditionalBatchNorm2d``).
        skip_z: BigGAN's hierarchical latent (Brock et al. 2019, "skip-z"): z is split into one chunk for G's input
            layer and one per block, and each block's (conditional) BatchNorm gains and biases also depend on its
            chunk, so the latent reaches every resolution directly instead of only through the 4x4 input.
        mbstd_group: a minibatch standard deviation channel in D (Karras et al. 2018, ProGAN; 0 = off, the paper's
            SAGAN): before D's last block, the spread of each group of this many images (real and generated never
            share a group) as one more feature map, so D can see a batch of near-copies. Against mode dropping of
            unconditional models; data.batch_size must be a multiple of it.
        loss: 'hinge' (SAGAN) or 'nonsaturating'.
        n_dis: discriminator steps per generator step.
        reuse_fakes: the generator step trains on the images G drew for the discriminator step just before it
            (their graph through G kept; D sees them detached), as PyTorch's DCGAN example does, instead of
            drawing fresh ones: one forward of G fewer per iteration (1.17x iterations per second on the demo's
            networks on a CPU), at the memory of G's activations held through the D step; with mode seeking the
            D step's images come in the G step's same-class pairs. On the digits (4 seeds, 1,600 iterations) it
            cost recall (0.80 of the floor's against 0.85) for no better FID (BENCHMARKS.md). Off: fresh latents
            for the G step (the official SAGAN code).
        lr_g, lr_d: Adam learning rates (TTUR).
        betas_g, betas_d: Adam betas.
        augment: DiffAugment policy (Zhao et al. 2020), a comma-separated subset of ``color,translation,cutout``
            applied to every image D sees, real and generated, in both steps ('' = off). For small data sets.
        lecam_weight: weight of the LeCam regulariser of D (Tseng et al. 2021; 0 = off, 0.3 in the paper's CIFAR-10
            runs); ``lecam_decay`` is the decay of its moving averages of D's outputs.
        mode_seeking: weight of the mode-seeking regulariser of G (Mao et al. 2019, ``losses.mode_seeking_reg``;
            0 = off): the G step's batch is drawn as pairs with the same label and different latents, and G pays
            the inverse of their image distance. Against within-class collapse of conditional models.
        mode_seeking_form: 'msgan', Mao et al.'s unbounded inverse image distance; or 'match_real', a bounded
            form in D's pooled features (``losses.diversity_match_reg``): G pays only while its same-class pairs
            lie closer together there than real same-class pairs do (a moving average, decay 0.99, over the
            real batches of the D steps).
        class_weight: weight of an auxiliary classifier in D (AC-GAN, Odena et al. 2017; 0 = off, the paper's
            SAGAN): a linear head on D's pooled features learns the classes of the real images (cross-entropy,
            weight ``class_weight`` in D's loss; real images only, so it never learns G's mistakes), and G pays
            the same cross-entropy for its samples. A class signal besides the projection, for conditional models
            whose samples drift out of their class (e.g. under ``mode_seeking``). Like ``conditional``, it applies
            when the model is conditional and the data has classes: otherwise it is off, with a warning (so
            ``--model.conditional false`` on a conditional recipe is the unconditional ablation of it).
        class_twin: TAC-GAN's twin auxiliary classifier (Gong et al., NeurIPS 2019; needs ``class_weight``): a second
            linear head learns the classes of the *generated* images (cross-entropy, weight ``class_weight`` in D's
            loss), and G's class term becomes the auxiliary classifier's cross-entropy minus the twin's. AC-GAN's
            term alone pays G for samples far from the class boundaries, which narrows each class; the difference
            pays it for matching the real images' class posterior instead.
        cond_ramp: transitional conditioning (Shahbazi et al., "Collapse by Conditioning", ICLR 2022): iterations
            (start, end) over which the class signal (G's conditional-BN gains and biases, D's projection term)
            grows linearly from 0 to full; before ``start`` the model trains unconditionally. None = conditional
            from the start (the paper's SAGAN).
        fake_labels: the classes G is asked for in training (conditional models): 'data', each class as often as
            the training set has it (StyleGAN2-ADA draws its labels from the training set), 'uniform' (SAGAN's,
            BigGAN-PyTorch's and StudioGAN's), or 'auto' (the default): 'data' where the data module gives class
            counts (``SAGANData.class_counts``, read at fit start), else 'uniform'. On a balanced set the two agree
            up to the random draw; on an imbalanced one 'data' trains G on the joint distribution of images and
            classes that D sees and that ``sagan evaluate`` asks for (imbalanced digits, two profiles, 3 seeds
            each: FID lower on 6 of 6, recall level or higher; BENCHMARKS.md "Imbalanced classes"). The standing
            statistics draw their classes the same way.
        ema_decay: decay of the EMA generator; ``ema_warmup`` ramps it up as (1+n)/(10+n).
        ema_bn_samples: "standing statistics" of the EMA generator (Brock et al. 2019, BigGAN, appendix C.1):
            before the EMA generator is used (sample grids, in-loop evaluation, attention maps) and in every
            checkpoint, its BatchNorm running statistics are recomputed for its own averaged weights from this many
            fresh samples (a private random stream seeded by ``sample_seed``: training itself is unchanged bit for
            bit). 0 = keep the running statistics of G, which belong to other weights (measured to cost FID,
            BENCHMARKS.md).
        sample_per_class: samples per class row in the fixed-noise grid (conditional models).
        sample_num: number of samples in the fixed-noise grid of unconditional models.
        sample_seed: seed of the fixed sample noise (stored in the checkpoint, so grids stay comparable on resume).
        nonfinite: what a non-finite loss or gradient norm does: 'stop' training with an error naming the step
            (the last good checkpoint stays as it was), or 'skip' that optimizer step, at most ``max_skips`` times
            (see ``checkpointing.DivergenceGuard``; an fp16 GradScaler overflow is not divergence).
        max_skips: how many non-finite steps 'skip' tolerates before stopping.
        channels_last: keep G, D and their inputs in channels-last memory format (on by default; equal to NCHW
            within float32 rounding, faster on the CPU, see BENCHMARKS.md). Mixed precision is the trainer's
            ``precision`` (``bf16-mixed``, or ``16-mixed`` with a GradScaler), not on by default because it changes
            the numerics of a recipe.
        compile: ``torch.compile`` the networks as used in the training steps (meant for long GPU runs; on the CPU
            it does not pay, see BENCHMARKS.md); a string is torch.compile's ``mode`` ('reduce-overhead' adds CUDA
            graphs).
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
        cbn_sn: bool = False,
        skip_z: bool = False,
        mbstd_group: int = 0,
        loss: Literal["hinge", "nonsaturating"] = "hinge",
        n_dis: int = 1,
        reuse_fakes: bool = False,
        lr_g: float = 1e-4,
        lr_d: float = 4e-4,
        betas_g: tuple[float, float] = (0.0, 0.9),
        betas_d: tuple[float, float] = (0.0, 0.9),
        augment: str = "",
        lecam_weight: float = 0.0,
        lecam_decay: float = 0.99,
        mode_seeking: float = 0.0,
        mode_seeking_form: Literal["msgan", "match_real"] = "msgan",
        class_weight: float = 0.0,
        class_twin: bool = False,
        cond_ramp: tuple[int, int] | None = None,
        fake_labels: Literal["auto", "data", "uniform"] = "auto",
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        ema_bn_samples: int = 1024,
        sample_per_class: int = 10,
        sample_num: int = 64,
        sample_seed: int = 0,
        nonfinite: Literal["stop", "skip"] = "stop",
        max_skips: int = 10,
        channels_last: bool = True,
        compile: bool | Literal["default", "reduce-overhead", "max-autotune"] = False,
    ) -> None:
        super().__init__()
        if n_dis < 1:
            raise ConfigError(f"model.n_dis must be >= 1, got {n_dis}")
        if not 0.0 <= ema_decay < 1.0:
            raise ConfigError(f"model.ema_decay must be in [0, 1), got {ema_decay}")
        for name, lr, betas in (("g", lr_g, betas_g), ("d", lr_d, betas_d)):
            if not lr > 0:
                raise ConfigError(f"model.lr_{name} must be > 0, got {lr}")
            if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
                raise ConfigError(f"model.betas_{name} must be two numbers in [0, 1) (Adam's beta1, beta2), got "
                                  f"{list(betas)}")
        if cond_ramp is not None and not (len(cond_ramp) == 2 and 0 <= cond_ramp[0] <= cond_ramp[1]):
            raise ConfigError(f"model.cond_ramp must be [start, end] iterations with 0 <= start <= end, got {cond_ramp}")
        if mbstd_group < 0:
            raise ConfigError(f"model.mbstd_group must be >= 0 (0 = off, e.g. 4), got {mbstd_group}")
        if mode_seeking < 0:
            raise ConfigError(f"model.mode_seeking must be >= 0, got {mode_seeking}")
        if fake_labels not in ("auto", "data", "uniform"):
            raise ConfigError(f"model.fake_labels must be 'auto', 'data' or 'uniform', got {fake_labels!r}")
        if ema_bn_samples < 0:
            raise ConfigError(f"model.ema_bn_samples must be >= 0 (0 = G's BatchNorm statistics), got {ema_bn_samples}")
        if class_weight < 0:
            raise ConfigError(f"model.class_weight must be >= 0, got {class_weight}")
        if class_twin and class_weight == 0:
            raise ConfigError("model.class_twin needs the auxiliary classifier it is the twin of: set "
                              "model.class_weight > 0 (e.g. 0.5), or model.class_twin false")
        if class_weight > 0 and not (conditional and num_classes > 0):  # off, like the conditioning itself
            why = ("the model is unconditional (model.conditional false)" if not conditional
                   else "the data has no classes (images directly in the folder)")
            warnings.warn(f"model.class_weight is ignored: {why}, so the model trains without the auxiliary "
                          "classifier", SaganWarning, stacklevel=2)
        if lecam_weight < 0 or not 0.0 <= lecam_decay < 1.0:
            raise ConfigError(f"model.lecam_weight must be >= 0 and model.lecam_decay in [0, 1), got "
                              f"{lecam_weight} and {lecam_decay}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        n_cls = num_classes if conditional else 0
        self.num_classes, self.z_dim, self.n_dis = n_cls, z_dim, n_dis
        self.generator = Generator(resolution, z_dim, g_ch, g_ch_mult, g_attn, n_cls, img_channels, cbn_sn,
                                   skip_z)
        self.class_weight = class_weight if n_cls > 0 else 0.0
        self.discriminator = Discriminator(resolution, d_ch, d_ch_mult, d_attn, n_cls, img_channels,
                                           aux_classifier=self.class_weight > 0,
                                           twin_classifier=self.class_weight > 0 and class_twin,
                                           mbstd_group=mbstd_group)
        self.g_ema = EMAGenerator(self.generator, ema_decay, ema_warmup)
        self.g_ema.requires_grad_(False)
        self.nets = TrainingNetworks(self.generator, self.discriminator, compile)  # DDP wrappers / compiled graphs
        self.d_loss_fn, self.g_loss_fn = get_losses(loss)
        self.augment = DiffAugment(augment)
        # LeCam's moving averages of D's mean output on real and generated images, and how many updates they had
        self.register_buffer("lecam_ema", torch.zeros(2))
        self.register_buffer("lecam_updates", torch.zeros((), dtype=torch.long))
        # 'match_real' mode seeking: moving average of the distance between real same-class pairs (0 = none yet)
        self.register_buffer("real_pair_distance", torch.zeros(()))
        # share of each class among G's training labels (fake_labels 'data': the training set's, set at fit start)
        self.register_buffer("fake_label_prior", torch.full((max(n_cls, 1),), 1.0 / max(n_cls, 1)))
        self.labels_from_data = fake_labels == "data"  # 'auto' decides at fit start
        self.counters = TrainingCounters()
        self.guard = DivergenceGuard(nonfinite, max_skips)
        self._last_step_time: float | None = None
        self._logged_any = False  # whether this process has called self.log for a batch yet
        self._ema_bn_fresh_at: tuple[int, int] | None = None  # (iteration, EMA updates) of the last refresh

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

    # ---------------------------------------------------------------------------------------------- training
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=hp.lr_g, betas=tuple(hp.betas_g))
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=hp.lr_d, betas=tuple(hp.betas_d))
        return [opt_g, opt_d]

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        """One batch: a discriminator step, and every ``n_dis``-th batch a generator step after it."""
        self.counters.batches_seen += 1
        x, y = batch[0], (batch[1] if self.conditional else None)
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.hparams.cond_ramp is not None and self.conditional:
            self._set_cond_strength(self.counters.g_steps)
        drawn = None  # with reuse_fakes, the G step's (z, y, images) drawn in the D step before it
        if self.hparams.get("reuse_fakes") and (self.counters.d_steps + 1) % self.n_dis == 0:
            z, y_fake = self.g_step_latents(x.shape[0])
            drawn = (z, y_fake, self.nets.g(z, y_fake))  # keeps its graph through G for the G step
        logs = self.d_step(x, y, drawn)
        if self.counters.d_steps % self.n_dis == 0:
            logs.update(self.g_step(x.shape[0], drawn))
        self._log_step(logs, x.shape[0])

    def d_step(self, x: Tensor, y: Tensor | None,
               drawn: tuple[Tensor, Tensor | None, Tensor] | None = None) -> dict[str, Tensor]:
        """One discriminator update on a real batch; G is only run forward (no gradients), or its images are
        ``drawn`` already (``reuse_fakes``). D sees real and fake images in one forward, both through the same
        augmentation policy."""
        _, opt_d = self.optimizers()
        b = x.shape[0]
        if drawn is None:
            z, y_fake = self.sample_latents(b)
            with torch.no_grad():
                fake = self.generator(z, y_fake)
        else:
            _, y_fake, fake = drawn
            fake = fake.detach()
        labels = torch.cat([y, y_fake]) if self.conditional else None
        out = self.nets.d(self.augment(torch.cat([x, fake])), labels, return_features=True)  # logits (2B,) ...
        if self.hparams.mode_seeking > 0 and self.hparams.mode_seeking_form == "match_real":
            self._track_real_distance(out.features[:b].detach(), y)  # the within-class distance G should reach
        d_real, d_fake = out.logits[:b], out.logits[b:]
        loss_d = self.d_loss_fn(d_real, d_fake)
        logs = {}
        if self.class_weight > 0:  # the auxiliary classifier learns the real images' classes only
            logs["class_d"] = F.cross_entropy(out.class_logits[:b], y)
            loss_d = loss_d + self.class_weight * logs["class_d"]
            if out.twin_logits is not None:  # the twin learns G's classes (TAC-GAN)
                logs["class_twin_d"] = F.cross_entropy(out.twin_logits[b:], y_fake)
                loss_d = loss_d + self.class_weight * logs["class_twin_d"]
        if self.hparams.lecam_weight > 0:
            logs["lecam"] = lecam_reg(d_real, d_fake, *self._lecam_update(d_real, d_fake))
            loss_d = loss_d + self.hparams.lecam_weight * logs["lecam"]
        _, grad_norm = self._update(opt_d, loss_d, self.discriminator, "discriminator")
        self.counters.d_steps += 1
        return {"loss_d": loss_d, "d_real": d_real.mean(), "d_fake": d_fake.mean(), **logs,
                "grad_norm_d": grad_norm, "lr_d": torch.tensor(opt_d.param_groups[0]["lr"])}

    def g_step(self, batch_size: int, drawn: tuple[Tensor, Tensor | None, Tensor] | None = None) -> dict[str, Tensor]:
        """One generator update through D, whose parameters are frozen (toggled off) and whose spectral-norm
        vectors stay put (eval mode: they move once per D step, as in the official code); then the EMA update.
        ``drawn``: the (z, y, images) G drew in the D step (``reuse_fakes``); else G draws fresh ones."""
        opt_g, _ = self.optimizers()
        self.toggle_optimizer(opt_g)
        self.discriminator.eval()
        if drawn is None:
            z, y_fake = self.g_step_latents(batch_size)
            fake = self.nets.g(z, y_fake)
        else:
            z, y_fake, fake = drawn
        ms = self.hparams.mode_seeking
        out = self.nets.d_frozen(self.augment(fake), y_fake, return_features=True)
        loss_g = self.g_loss_fn(out.logits)
        logs = {}
        if self.class_weight > 0:
            logs["class_g"] = F.cross_entropy(out.class_logits, y_fake)
            loss_g = loss_g + self.class_weight * logs["class_g"]
            if out.twin_logits is not None:  # ... minus the twin's: match the real class posterior (TAC-GAN)
                logs["class_twin_g"] = F.cross_entropy(out.twin_logits, y_fake)
                loss_g = loss_g - self.class_weight * logs["class_twin_g"]
        if ms > 0:
            logs["mode_seeking"] = (diversity_match_reg(out.features, self.real_pair_distance)
                                    if self.hparams.mode_seeking_form == "match_real" else mode_seeking_reg(fake, z))
            loss_g = loss_g + ms * logs["mode_seeking"]
        stepped, grad_norm = self._update(opt_g, loss_g, self.generator, "generator")
        self.discriminator.train()
        self.untoggle_optimizer(opt_g)
        if stepped:
            self._update_ema()
        self.counters.g_steps += 1
        return {"loss_g": loss_g, "grad_norm_g": grad_norm, **logs,
                "lr_g": torch.tensor(opt_g.param_groups[0]["lr"])}

    # ----------------------------------------------------------------------------------------------- helpers
    def _update(self, opt: Any, loss: Tensor, net: torch.nn.Module, name: str) -> tuple[bool, Tensor]:
        """Backward, gradient norm, divergence check, optimizer step: (whether the step ran, gradient norm)."""
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        grad_norm = _grad_norm(net)
        where = (f"iteration {self.counters.g_steps} (optimizer step {self.trainer.global_step}, "
                 f"batch {self.counters.batches_seen})")
        if not self.guard.check(self.trainer, self.counters, name, loss, grad_norm, where):
            return False, grad_norm
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scale = scaler.get_scale() if scaler is not None else None
        opt.step()
        if scaler is not None and scaler.get_scale() < scale:  # the GradScaler found inf/NaN and skipped the step
            self.counters.amp_skipped_steps += 1
            return False, grad_norm
        return True, grad_norm

    def _set_cond_strength(self, iteration: int) -> None:
        strength = conditioning_strength(self.hparams.cond_ramp, iteration)
        for m in (self.generator, self.discriminator, self.g_ema.module):
            m.cond_strength = strength

    @torch.no_grad()
    def _lecam_update(self, d_real: Tensor, d_fake: Tensor) -> tuple[Tensor, Tensor]:
        """Update LeCam's moving averages with this batch's mean outputs (averaged over ranks, so every rank holds
        the same values; the first update copies) and return them."""
        means = torch.stack([d_real.mean(), d_fake.mean()]).float()
        if self.trainer.world_size > 1:
            means = self.trainer.strategy.reduce(means, reduce_op="mean")
        decay = (self.lecam_updates > 0).float() * self.hparams.lecam_decay  # on the device: no host read
        self.lecam_ema.mul_(decay).add_(means * (1.0 - decay))
        self.lecam_updates += 1
        return self.lecam_ema[0].clone(), self.lecam_ema[1].clone()

    @torch.no_grad()
    def _track_real_distance(self, feats: Tensor, y: Tensor | None) -> None:
        """Fold this real batch's mean same-class pair distance in D's features (averaged over ranks) into
        ``real_pair_distance``; the first estimate is copied, a batch without a same-class pair changes nothing."""
        dist = same_class_distance(feats, y)
        if self.trainer.world_size > 1:
            both = torch.stack([torch.nan_to_num(dist), (~dist.isnan()).float()])
            both = self.trainer.strategy.reduce(both, reduce_op="sum")
            dist = both[0] / both[1]  # 0/0 = NaN where no rank had a pair
        old = self.real_pair_distance  # the update stays on the device (torch.where, no host read)
        new = torch.where(old == 0, dist, 0.99 * old + 0.01 * dist)
        self.real_pair_distance.copy_(torch.where(dist.isnan(), old, new))

    @torch.no_grad()
    def _update_ema(self) -> None:
        """Average G's weights into the EMA generator (its BatchNorm statistics are G's until
        ``refresh_ema_bn_stats`` replaces them before a use), then run one power iteration of the EMA's own
        spectral-norm vectors against its averaged weights. The EMA network is thus a complete spectrally
        normalised network: evaluated in the loop, saved, and loaded by ``sagan evaluate`` / ``generate``, it is
        the same network."""
        self.g_ema.update_parameters(self.generator)  # copies G's buffers but for the EMA's own SN vectors
        refresh_spectral_norm(self.g_ema.module, n_iterations=1)

    def _log_step(self, logs: dict[str, Tensor], batch_size: int) -> None:
        now = time.perf_counter()
        last, self._last_step_time = self._last_step_time, now
        if not self._logs_this_batch():
            return
        if last is not None:  # real images per second, all processes together
            logs["images_per_s"] = torch.tensor(batch_size * self.trainer.world_size / (now - last))
        logs = {k: v.detach() for k, v in logs.items()}
        bar = {"loss_d", "loss_g", "d_real", "d_fake"}
        self.log_dict({f"train/{k}": v for k, v in logs.items() if k in bar}, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{k}": v for k, v in logs.items() if k not in bar}, batch_size=batch_size)
        gammas = {f"attention/gamma_G{r}": m.gamma.detach() for r, m in attention_layers(self.generator).items()}
        gammas.update({f"attention/gamma_D{r}": m.gamma.detach() for r, m in attention_layers(self.discriminator).items()})
        self.log_dict(gammas, batch_size=batch_size)
        self.log("train/iteration", float(self.counters.g_steps), batch_size=batch_size)

    def _logs_this_batch(self) -> bool:
        """Whether this batch's values go to ``self.log``: on the batches whose values Lightning writes to the
        loggers (every ``trainer.log_every_n_steps`` batches, as its logger connector counts them), on this
        process's first batch and on the last one. Lightning keeps only those values, so the dashboards are
        the same; the ~15 ``self.log`` calls cost about 4% of the demo's CPU step (BENCHMARKS.md, W&B section)
        and a larger share of a small model's step on a GPU, so the other batches skip them."""
        trainer = self.trainer
        n = trainer.log_every_n_steps
        last = trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step
        if self._logged_any and not (last or (n > 0 and self.counters.batches_seen % n == 0)):
            return False
        self._logged_any = True
        return True

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    @property
    def g_steps(self) -> int:
        """Generator updates so far (= iterations)."""
        return self.counters.g_steps

    @property
    def d_steps(self) -> int:
        """Discriminator updates so far."""
        return self.counters.d_steps

    @property
    def batches_seen(self) -> int:
        """Training batches consumed: the position in the data (see ``SAGANData.train_dataloader``)."""
        return self.counters.batches_seen

    @property
    def skipped_steps(self) -> int:
        return self.counters.skipped_steps

    def sample_latents(self, n: int) -> tuple[Tensor, Tensor | None]:
        """Random latents z ~ N(0, I) and, for conditional models, class labels (``fake_labels``)."""
        z = torch.randn(n, self.z_dim, device=self.device)
        return z, self._fake_labels(n)

    def _fake_labels(self, n: int, gen: torch.Generator | None = None) -> Tensor | None:
        """``n`` training labels of G: uniform, or drawn from the training set's class frequencies."""
        if not self.conditional:
            return None
        if self.labels_from_data:
            return torch.multinomial(self.fake_label_prior, n, replacement=True, generator=gen)
        return torch.randint(0, self.num_classes, (n,), generator=gen, device=self.device)

    def g_step_latents(self, n: int) -> tuple[Tensor, Tensor | None]:
        """The latents of a G step: with mode seeking, pairs (the second half asks for the first half's classes)."""
        z, y = self.sample_latents(n)
        if self.hparams.mode_seeking > 0 and y is not None:
            y[n // 2 : 2 * (n // 2)] = y[: n // 2]
        return z, y

    def ema_generator(self) -> Generator:
        """The EMA generator in eval mode with its standing BatchNorm statistics, exactly as ``sagan evaluate`` and
        ``sagan generate`` load it from a checkpoint."""
        self.refresh_ema_bn_stats()
        return self.g_ema.module.eval()

    @torch.no_grad()
    def refresh_ema_bn_stats(self) -> None:
        """Recompute the EMA generator's BatchNorm running statistics for its own weights: the cumulative average
        (momentum None) of the batch statistics of ``ema_bn_samples`` fresh samples, classes drawn as in training
        (``fake_labels``), batches of 64, with only the BatchNorm layers in training mode (spectral-norm vectors
        stay put). Idempotent between two EMA updates; a private random stream, so the training's streams are
        untouched."""
        n = self.hparams.get("ema_bn_samples", 0)
        key = (self.counters.g_steps, int(self.g_ema.n_averaged))
        g = self.g_ema.module
        bns = [m for m in g.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if n <= 0 or not bns or self._ema_bn_fresh_at == key:
            return
        gen = torch.Generator(device=self.device).manual_seed(int(self.hparams.sample_seed))
        momenta = [m.momentum for m in bns]
        g.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for b in [64] * (n // 64) + ([n % 64] if n % 64 > 1 else []):
            z = torch.randn(b, self.z_dim, generator=gen, device=self.device)
            g(z, self._fake_labels(b, gen))
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
            m.eval()
        self._ema_bn_fresh_at = key

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

    # ---------------------------------------------------------------------------------------- lightning hooks
    def configure_model(self) -> None:
        """channels_last before the strategy wraps the networks in DDP, so gradient buckets match the layout."""
        if self.hparams.channels_last:
            for m in (self.generator, self.discriminator, self.g_ema):
                m.to(memory_format=torch.channels_last)

    def on_fit_start(self) -> None:
        from pytorch_lightning.strategies import DDPStrategy

        from .strategy import GANDDPStrategy

        strategy = self.trainer.strategy
        if (isinstance(strategy, DDPStrategy) and not isinstance(strategy, GANDDPStrategy)
                and not strategy._ddp_kwargs.get("find_unused_parameters", False)):
            raise ConfigError(
                "one DDP wrapper around G and D needs find_unused_parameters=True (a D step never uses G): use "
                "--trainer.strategy ddp with the sagan command (sagan.strategy.GANDDPStrategy, one wrapper per "
                "network), or --trainer.strategy ddp_find_unused_parameters_true"
            )

        if self.conditional and self.hparams.fake_labels != "uniform":
            self._set_fake_label_prior()
        group, batch = self.hparams.get("mbstd_group", 0), getattr(self.trainer.datamodule, "batch_size", None)
        if group and batch is not None and batch % group:
            raise ConfigError(f"model.mbstd_group={group} needs data.batch_size to be a multiple of it, got "
                              f"{batch}: change either")

    def _set_fake_label_prior(self) -> None:
        """``fake_labels`` 'data' / 'auto': the training set's class frequencies, from the data module (every rank
        counts the whole set, so all ranks agree); 'auto' without class counts (plain data loaders) is 'uniform'."""
        dm = getattr(self.trainer, "datamodule", None)
        counts = dm.class_counts("train") if hasattr(dm, "class_counts") else None
        self.labels_from_data = not (counts is None and self.hparams.fake_labels == "auto")
        if not self.labels_from_data:
            return
        if counts is None or len(counts) != self.num_classes or int(counts.sum()) == 0:
            found = "no class counts" if counts is None else f"{len(counts)} classes, {int(counts.sum())} images"
            raise ConfigError(f"model.fake_labels {self.hparams.fake_labels!r} needs the training set's class "
                              f"counts for {self.num_classes} classes, and the data gave {found}: train with sagan's "
                              "data module on a labelled set, or set model.fake_labels uniform")
        self.fake_label_prior.copy_(counts.double() / counts.sum())

    def on_train_start(self) -> None:
        seed_step(run_seed(), self.global_rank, self.counters.batches_seen)  # the random streams of the next batch

    def on_train_batch_end(self, *args: Any) -> None:
        seed_step(run_seed(), self.global_rank, self.counters.batches_seen)

    ARCHITECTURE_KEYS = ("resolution", "img_channels", "num_classes", "conditional", "z_dim", "g_ch", "d_ch",
                         "g_ch_mult", "d_ch_mult", "g_attn", "d_attn", "cbn_sn", "skip_z", "mbstd_group")
    LEGACY_DEFAULTS = {"cbn_sn": True, "skip_z": False, "mbstd_group": 0}  # what checkpoints written before a key existed used

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sagan"] = self.counters.state_dict()  # no random state: see checkpointing.seed_step
        names = getattr(self.trainer.datamodule, "classes", None)  # the image folder's subfolders, CIFAR-10's names
        if self.num_classes and names is not None and len(names) == self.num_classes:
            checkpoint["class_names"] = [str(n) for n in names]  # `sagan generate --class-label NAME`, per-class folders
        if self.hparams.get("ema_bn_samples", 0) > 0:  # the EMA generator is saved with its standing statistics
            self.refresh_ema_bn_stats()
            state = checkpoint["state_dict"]
            for name, buf in self.g_ema.named_buffers(prefix="g_ema"):
                if name in state and name.endswith(("running_mean", "running_var", "num_batches_tracked")):
                    state[name] = buf.detach().clone()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        hp = {**self.LEGACY_DEFAULTS, **checkpoint.get("hyper_parameters", {})}
        diff = {k: (hp.get(k), self.hparams.get(k)) for k in self.ARCHITECTURE_KEYS
                if k in hp and _norm(hp.get(k)) != _norm(self.hparams.get(k))}
        if diff:
            pretty = ", ".join(f"{k}={a!r} in the checkpoint vs {b!r} here" for k, (a, b) in diff.items())
            raise CheckpointError(
                f"the checkpoint is of another architecture ({pretty}): resume with the run's own config "
                "(its config.yaml), or start a fresh run"
            )
        for key, value in (("lecam_ema", self.lecam_ema), ("lecam_updates", self.lecam_updates),
                           ("real_pair_distance", self.real_pair_distance),
                           ("fake_label_prior", self.fake_label_prior)):
            checkpoint["state_dict"].setdefault(key, value.detach().clone())  # checkpoints from before these buffers
        self.counters.load_state_dict(checkpoint.get("sagan", {}))
        if self.hparams.get("cond_ramp") is not None and self.conditional:
            self._set_cond_strength(self.counters.g_steps)
