"""SAGAN generator and discriminator (Zhang et al. 2019, arXiv 1805.08318).

ResNet blocks in the SNGAN / BigGAN style (Miyato et al. 2018; Brock et al. 2019): the generator upsamples
4x4 -> resolution with conditional-BN residual blocks, the discriminator downsamples with ReLU residual blocks,
sums over positions and adds a class projection (Miyato & Koyama 2018) when class-conditional. Spectral norm on
every conv, linear and embedding of both networks; :class:`~sagan.layers.SelfAttention2d` after the block(s) whose
output feature map has a listed resolution. Resolutions 32, 64 and 128 share one code path.

Plain ``nn.Module`` s: nothing here imports Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError
from .layers import ConditionalBatchNorm2d, SelfAttention2d, minibatch_stddev, sn_conv2d, sn_embedding, sn_linear

SUPPORTED_RESOLUTIONS = (32, 64, 128)

# Channel multipliers of the base width ``ch``. Generator: the 4x4 input, then the output of each upsampling block.
G_CH_MULT = {32: (4, 4, 4, 4), 64: (16, 16, 8, 4, 2), 128: (16, 16, 8, 4, 2, 1)}
# Discriminator: the output of each block; the first ``D_DOWNSAMPLES[res]`` blocks halve the resolution.
D_CH_MULT = {32: (2, 2, 2, 2), 64: (1, 2, 4, 8, 16), 128: (1, 2, 4, 8, 16, 16)}
D_DOWNSAMPLES = {32: 2, 64: 4, 128: 5}
# Where the paper puts attention: after the 32x32 stage (for 32x32 images, where D never sees 32x32 features
# after a block, the 16x16 stage).
DEFAULT_ATTN = {32: (16,), 64: (32,), 128: (32,)}


def check_resolution(resolution: int, what: str = "data.resolution") -> None:
    """A resolution the networks are built for; else a :class:`ConfigError` naming the setting ``what``."""
    if resolution not in SUPPORTED_RESOLUTIONS:
        raise ConfigError(
            f"{what} {resolution} is not supported: the models are built for {list(SUPPORTED_RESOLUTIONS)}; "
            f"set {what} to one of these"
        )


def _check_attn(name: str, attn: Sequence[int], available: Sequence[int]) -> None:
    bad = [r for r in attn if r not in available]
    if bad:
        raise ConfigError(
            f"{name}: attention resolution(s) {bad} do not occur in this network; "
            f"its blocks output feature maps of {sorted(set(available))}"
        )


def conditioning_strength(ramp: Sequence[int] | None, iteration: int) -> float:
    """Scale of the class signal at a generator iteration under transitional conditioning (``SAGAN.cond_ramp``):
    0 before ``ramp[0]``, rising linearly to 1 at ``ramp[1]``; 1 (the plain model) without a ramp. The strength is
    a function of the iteration, so it needs no place in the state dict: a checkpoint taken mid-transition is
    evaluated as it was trained (``generator_from_checkpoint``)."""
    if ramp is None:
        return 1.0
    start, end = ramp
    return 1.0 if iteration >= end else 0.0 if iteration < start else (iteration - start) / max(end - start, 1)


class GBlock(nn.Module):
    """Generator residual block: CBN-ReLU-up-conv3x3-CBN-ReLU-conv3x3, plus up-conv1x1 shortcut."""

    def __init__(self, in_ch: int, out_ch: int, num_classes: int, cbn_sn: bool = False, z_dim: int = 0) -> None:
        super().__init__()
        self.bn1 = ConditionalBatchNorm2d(in_ch, num_classes, sn=cbn_sn, z_dim=z_dim)
        self.conv1 = sn_conv2d(in_ch, out_ch, 3)
        self.bn2 = ConditionalBatchNorm2d(out_ch, num_classes, sn=cbn_sn, z_dim=z_dim)
        self.conv2 = sn_conv2d(out_ch, out_ch, 3)
        self.shortcut = sn_conv2d(in_ch, out_ch, 1, padding=0)

    def forward(self, x: Tensor, y: Tensor | None, strength: float = 1.0, z: Tensor | None = None) -> Tensor:
        h = F.relu(self.bn1(x, y, strength, z))
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        h = self.conv1(h)
        h = self.conv2(F.relu(self.bn2(h, y, strength, z)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DBlock(nn.Module):
    """Discriminator residual block (SNGAN). ``first=True`` is the 'optimized' input block without a leading ReLU."""

    def __init__(self, in_ch: int, out_ch: int, downsample: bool, first: bool = False) -> None:
        super().__init__()
        self.first = first
        self.downsample = downsample
        self.conv1 = sn_conv2d(in_ch, out_ch, 3)
        self.conv2 = sn_conv2d(out_ch, out_ch, 3)
        self.learnable_sc = in_ch != out_ch or downsample
        if self.learnable_sc:
            self.shortcut = sn_conv2d(in_ch, out_ch, 1, padding=0)

    def _shortcut(self, x: Tensor) -> Tensor:
        if self.first:  # pool then conv (cheaper, as SNGAN's optimized block)
            return self.shortcut(F.avg_pool2d(x, 2) if self.downsample else x)
        if self.learnable_sc:
            x = self.shortcut(x)
        return F.avg_pool2d(x, 2) if self.downsample else x

    def forward(self, x: Tensor) -> Tensor:
        h = x if self.first else F.relu(x)
        h = self.conv2(F.relu(self.conv1(h)))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        return h + self._shortcut(x)


class Generator(nn.Module):
    """SAGAN ResNet generator: z (B, z_dim) [+ class y (B,)] -> image (B, img_channels, R, R) in [-1, 1].

    ``cbn_sn``: spectrally normalised class embeddings in conditional BN (StudioGAN) instead of the official
    per-class gain/bias initialised to 1/0 (see :class:`~sagan.layers.ConditionalBatchNorm2d`).
    """

    def __init__(
        self,
        resolution: int = 32,
        z_dim: int = 128,
        ch: int = 64,
        ch_mult: Sequence[int] | None = None,
        attn_resolutions: Sequence[int] | None = None,
        num_classes: int = 0,
        img_channels: int = 3,
        cbn_sn: bool = False,
        skip_z: bool = False,
    ) -> None:
        super().__init__()
        check_resolution(resolution)
        n_blocks = int(math.log2(resolution // 4))
        mult = tuple(ch_mult) if ch_mult is not None else G_CH_MULT[resolution]
        if len(mult) != n_blocks + 1:
            raise ConfigError(
                f"generator ch_mult must have {n_blocks + 1} entries for resolution {resolution} "
                f"(the 4x4 input and {n_blocks} upsampling blocks), got {list(mult)}"
            )
        attn = tuple(attn_resolutions) if attn_resolutions is not None else DEFAULT_ATTN[resolution]
        block_res = [4 * 2 ** (i + 1) for i in range(n_blocks)]
        _check_attn("generator", attn, block_res)
        self.resolution, self.z_dim, self.num_classes, self.img_channels = resolution, z_dim, num_classes, img_channels
        chans = [ch * m for m in mult]
        if skip_z and z_dim < n_blocks + 1:
            raise ConfigError(f"a hierarchical latent (skip_z) needs z_dim >= {n_blocks + 1} (one chunk per block "
                              f"and the input), got {z_dim}")
        # hierarchical latent: z splits into one chunk for the input layer and one per block (the first takes the rest)
        self.z_chunks = [z_dim - n_blocks * (z_dim // (n_blocks + 1))] + [z_dim // (n_blocks + 1)] * n_blocks \
            if skip_z else [z_dim]
        self.linear = sn_linear(self.z_chunks[0], chans[0] * 4 * 4)
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleDict()  # block index -> attention after that block
        self.attn_resolution: dict[str, int] = {}
        for i in range(n_blocks):
            self.blocks.append(GBlock(chans[i], chans[i + 1], num_classes, cbn_sn, self.z_chunks[-1] if skip_z else 0))
            if block_res[i] in attn:
                self.attn[str(i)] = SelfAttention2d(chans[i + 1])
                self.attn_resolution[str(i)] = block_res[i]
        self.out_bn = nn.BatchNorm2d(chans[-1])
        self.out_conv = sn_conv2d(chans[-1], img_channels, 3)
        self.cond_strength = 1.0  # scale of the class signal (transitional conditioning); see conditioning_strength

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def forward(
        self, z: Tensor, y: Tensor | None = None, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, dict[int, Tensor]]:
        if self.conditional and y is None:
            raise ValueError("this generator is class-conditional: pass class labels y of shape (B,)")
        maps: dict[int, Tensor] = {}
        zs = torch.split(z, self.z_chunks, dim=1) if len(self.z_chunks) > 1 else (z,)  # (B, z_chunk) each
        h = self.linear(zs[0]).view(z.shape[0], -1, 4, 4)  # (B, C0, 4, 4)
        for i, block in enumerate(self.blocks):
            h = block(h, y if self.conditional else None, self.cond_strength, zs[i + 1] if len(zs) > 1 else None)
            if str(i) in self.attn:
                if return_attention:
                    h, maps[h.shape[-1]] = self.attn[str(i)](h, return_attention=True)
                else:
                    h = self.attn[str(i)](h)
        img = torch.tanh(self.out_conv(F.relu(self.out_bn(h))))
        return (img, maps) if return_attention else img


class DOutput(NamedTuple):
    """What the training steps read from D: logits (B,), the pooled features (B, C) they are read from, the
    auxiliary classifier's class logits (B, num_classes) when D has one and its twin's (TAC-GAN) when D has that
    (else None)."""

    logits: Tensor
    features: Tensor
    class_logits: Tensor | None
    twin_logits: Tensor | None = None


class Discriminator(nn.Module):
    """SAGAN ResNet discriminator with projection: image (B, C, R, R) [+ y (B,)] -> logits (B,).

    ``aux_classifier``: also a spectrally normalised linear classifier on the pooled features (the auxiliary
    classifier of AC-GAN, Odena et al. 2017), read by :class:`~sagan.module.SAGAN` when ``class_weight > 0``;
    ``twin_classifier``: a second one of the same shape, the twin auxiliary classifier of TAC-GAN (Gong et al. 2019),
    which :class:`~sagan.module.SAGAN` trains on generated images (``class_twin``).
    ``mbstd_group``: a minibatch standard deviation channel (:func:`~sagan.layers.minibatch_stddev`, ProGAN) over
    groups of this many consecutive samples, fed to the last block (0 = none, the paper's SAGAN); every batch D sees
    must then be a multiple of it.
    """

    def __init__(
        self,
        resolution: int = 32,
        ch: int = 64,
        ch_mult: Sequence[int] | None = None,
        attn_resolutions: Sequence[int] | None = None,
        num_classes: int = 0,
        img_channels: int = 3,
        aux_classifier: bool = False,
        twin_classifier: bool = False,
        mbstd_group: int = 0,
    ) -> None:
        super().__init__()
        check_resolution(resolution)
        if mbstd_group < 0:
            raise ConfigError(f"mbstd_group must be >= 0 (0 = no minibatch stddev), got {mbstd_group}")
        n_down = D_DOWNSAMPLES[resolution]
        mult = tuple(ch_mult) if ch_mult is not None else D_CH_MULT[resolution]
        if len(mult) < n_down:
            raise ConfigError(
                f"discriminator ch_mult needs at least {n_down} entries for resolution {resolution} "
                f"(one per downsampling block), got {list(mult)}"
            )
        attn = tuple(attn_resolutions) if attn_resolutions is not None else DEFAULT_ATTN[resolution]
        block_res = [resolution // 2 ** min(i + 1, n_down) for i in range(len(mult))]
        _check_attn("discriminator", attn, block_res)
        self.resolution, self.num_classes, self.img_channels = resolution, num_classes, img_channels
        self.mbstd_group = mbstd_group
        chans = [img_channels] + [ch * m for m in mult]
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleDict()  # block index -> attention after that block
        self.attn_resolution: dict[str, int] = {}
        for i in range(len(mult)):
            extra = 1 if mbstd_group and i == len(mult) - 1 else 0  # the minibatch stddev channel
            self.blocks.append(DBlock(chans[i] + extra, chans[i + 1], downsample=i < n_down, first=i == 0))
            if block_res[i] in attn and block_res[i] not in self.attn_resolution.values():  # once per resolution
                self.attn[str(i)] = SelfAttention2d(chans[i + 1])
                self.attn_resolution[str(i)] = block_res[i]
        self.linear = sn_linear(chans[-1], 1)
        if num_classes > 0:
            self.embed = sn_embedding(num_classes, chans[-1])
        self.classifier = sn_linear(chans[-1], num_classes) if aux_classifier and num_classes > 0 else None
        self.twin_classifier = sn_linear(chans[-1], num_classes) if twin_classifier and num_classes > 0 else None
        self.cond_strength = 1.0  # weight of the projection term (transitional conditioning); see conditioning_strength

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def forward(
        self, x: Tensor, y: Tensor | None = None, return_features: bool = False
    ) -> Tensor | DOutput:
        """Logits (B,); with ``return_features`` a :class:`DOutput`: the logits, the pooled features (B, C) they
        are read from and the auxiliary (and twin) class logits."""
        if self.conditional and y is None:
            raise ValueError("this discriminator is class-conditional: pass class labels y of shape (B,)")
        h = x
        for i, block in enumerate(self.blocks):
            if self.mbstd_group and i == len(self.blocks) - 1:
                h = minibatch_stddev(h, self.mbstd_group)  # (B, C + 1, H, W)
            h = block(h)
            if str(i) in self.attn:
                h = self.attn[str(i)](h)
        h = F.relu(h).sum(dim=(2, 3))  # (B, C) global sum pooling
        out = self.linear(h).squeeze(1)  # (B,)
        if self.conditional:
            proj = (self.embed(y) * h).sum(dim=1)  # projection term <embed(y), h>
            out = out + (proj if self.cond_strength == 1.0 else self.cond_strength * proj)
        if not return_features:
            return out
        return DOutput(out, h, self.classifier(h) if self.classifier is not None else None,
                       self.twin_classifier(h) if self.twin_classifier is not None else None)


def attention_layers(model: Generator | Discriminator) -> dict[int, SelfAttention2d]:
    """The attention blocks of a model keyed by the resolution of the feature map they attend over."""
    return {model.attn_resolution[k]: layer for k, layer in model.attn.items()}
