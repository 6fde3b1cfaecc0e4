"""Differentiable augmentation for data-efficient GAN training: DiffAugment (Zhao, Liu, Lin, Zhu, Han,
"Differentiable Augmentation for Data-Efficient GAN Training", NeurIPS 2020, arXiv 2006.10738).

Every image the discriminator sees, real or generated, in the D step and in the G step, goes through the same
random transformations (drawn independently per image), written with differentiable tensor operations so that G's
gradient flows back through them. D then cannot memorise a small training set pixel by pixel, and G is never
rewarded for reproducing the augmentations, since real images are augmented the same way.

Policies (comma-separated, applied in this order), on images in [-1, 1] as in the paper's code:

* ``color``: brightness ``x + U(-0.5, 0.5)``, saturation ``mean_c + (x - mean_c) * U(0, 2)`` (a no-op on one
  channel), contrast ``mean + (x - mean) * U(0.5, 1.5)``, each factor drawn per image;
* ``translation``: a shift of up to 1/8 of the image size per axis (whole pixels, zero padding);
* ``cutout``: a square of half the image size set to 0, centred anywhere on the image (clipped at the border).

Plain tensor code rather than kornia: kornia's translation resamples with ``grid_sample`` (bilinear, i.e. it blurs,
or nearest on fractional shifts) and its colour operations expect [0, 1] RGB; the paper's operations are a few
gathers and multiplications, and cost less than its per-call overhead (BENCHMARKS.md, "DiffAugment").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

POLICIES = ("color", "translation", "cutout")


def parse_policy(policy: str | Sequence[str] | None) -> tuple[str, ...]:
    """'translation,cutout' or ['translation', 'cutout'] -> ('translation', 'cutout'); '' / None / [] -> ()."""
    if policy is None:
        return ()
    names = [p.strip().lower() for p in (policy.split(",") if isinstance(policy, str) else policy)]
    names = [n for n in names if n]
    bad = [n for n in names if n not in POLICIES]
    if bad:
        from .errors import ConfigError

        raise ConfigError(f"unknown augmentation {bad}: model.augment takes a comma-separated subset of "
                          f"{', '.join(POLICIES)} (or '' for none)")
    return tuple(dict.fromkeys(names))


def _uniform(x: Tensor, low: float, high: float) -> Tensor:
    """One factor per image, (B, 1, 1, 1), in x's dtype and device."""
    return torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) * (high - low) + low


def color(x: Tensor) -> Tensor:
    x = x + _uniform(x, -0.5, 0.5)  # brightness
    mean_c = x.mean(dim=1, keepdim=True)  # (B, 1, H, W)
    x = (x - mean_c) * _uniform(x, 0.0, 2.0) + mean_c  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return (x - mean) * _uniform(x, 0.5, 1.5) + mean  # contrast


def translation(x: Tensor, ratio: float = 0.125) -> Tensor:
    """Shift each image by whole pixels, up to ``ratio`` of its size per axis, filling with zeros."""
    b, c, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = torch.randint(-sy, sy + 1, (b, 1), device=x.device)  # (B, 1)
    tx = torch.randint(-sx, sx + 1, (b, 1), device=x.device)
    rows = (torch.arange(h, device=x.device) + ty + sy).clamp(0, h + 2 * sy - 1)  # (B, H) rows of the padded image
    cols = (torch.arange(w, device=x.device) + tx + sx).clamp(0, w + 2 * sx - 1)  # (B, W)
    padded = torch.nn.functional.pad(x, (sx, sx, sy, sy))  # (B, C, H + 2sy, W + 2sx), zeros around
    bi = torch.arange(b, device=x.device)[:, None, None]  # (B, 1, 1)
    out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous(memory_format=_format(x))  # (B, C, H, W)


def cutout(x: Tensor, ratio: float = 0.5) -> Tensor:
    """Zero a square of ``ratio`` times the image size, centred at a random position (clipped at the border)."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), device=x.device)  # centre, (B, 1, 1)
    cx = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), device=x.device)
    ys = torch.arange(h, device=x.device)[None, :, None]  # (1, H, 1)
    xs = torch.arange(w, device=x.device)[None, None, :]  # (1, 1, W)
    inside = (ys >= cy - ch // 2) & (ys < cy - ch // 2 + ch) & (xs >= cx - cw // 2) & (xs < cx - cw // 2 + cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)  # (B, 1, H, W) mask broadcast over channels


def _format(x: Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and \
        not x.is_contiguous() else torch.contiguous_format


_OPS = {"color": color, "translation": translation, "cutout": cutout}


class DiffAugment:
    """``DiffAugment('color,translation,cutout')(x)``: the policy's transformations, each image its own draw.

    An empty policy is the identity and draws no random numbers, so training without augmentation is unchanged.
    """

    def __init__(self, policy: str | Sequence[str] | None = "") -> None:
        self.policy = parse_policy(policy)

    def __bool__(self) -> bool:
        return bool(self.policy)

    def __call__(self, x: Tensor) -> Tensor:
        for name in self.policy:
            x = _OPS[name](x)
        return x

    def __repr__(self) -> str:
        return f"DiffAugment({','.join(self.policy)!r})"
