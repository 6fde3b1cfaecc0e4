"""Adversarial losses as pure functions of discriminator logits.

* hinge (Lim & Ye 2017; Miyato et al. 2018), used by SAGAN:
  L_D = E[relu(1 - D(x))] + E[relu(1 + D(G(z)))],  L_G = -E[D(G(z))]
* non-saturating (Goodfellow et al. 2014): L_D = E[softplus(-D(x))] + E[softplus(D(G(z)))],
  L_G = E[softplus(-D(G(z)))]
* LeCam regularisation of D (Tseng, Jiang, Liu, Yang, Yang, "Regularizing Generative Adversarial Networks under
  Limited Data", CVPR 2021): R = E[relu(D(x) - a_F)^2] + E[relu(a_R - D(G(z)))^2], with a_R and a_F moving
  averages of D's mean output on real and generated images; added to L_D with a weight (0.3 for CIFAR-10 in the
  paper, 0.01 for ImageNet). It keeps D's predictions near their recent range, which limits how far D can
  separate the few training images it has seen from everything else.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def _check(name: str, t: Tensor) -> None:
    if t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor of logits (B,), got shape {tuple(t.shape)}")


def d_hinge(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    _check("real_logits", real_logits)
    _check("fake_logits", fake_logits)
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def g_hinge(fake_logits: Tensor) -> Tensor:
    _check("fake_logits", fake_logits)
    return -fake_logits.mean()


def d_nonsaturating(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    _check("real_logits", real_logits)
    _check("fake_logits", fake_logits)
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_nonsaturating(fake_logits: Tensor) -> Tensor:
    _check("fake_logits", fake_logits)
    return F.softplus(-fake_logits).mean()


def lecam_reg(real_logits: Tensor, fake_logits: Tensor, ema_real: Tensor, ema_fake: Tensor) -> Tensor:
    """LeCam regulariser R (see the module docstring); ``ema_real`` / ``ema_fake`` are scalars (no gradient)."""
    _check("real_logits", real_logits)
    _check("fake_logits", fake_logits)
    return F.relu(real_logits - ema_fake).pow(2).mean() + F.relu(ema_real - fake_logits).pow(2).mean()


LOSSES: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "hinge": (d_hinge, g_hinge),
    "nonsaturating": (d_nonsaturating, g_nonsaturating),
}


def _pair_distance(x: Tensor) -> Tensor:
    """Mean absolute difference of each pair (first half of the batch vs the second half): (B/2,)."""
    half = x.shape[0] // 2
    return (x[:half] - x[half : 2 * half]).abs().flatten(1).mean(1)


def mode_seeking_reg(fake: Tensor, z: Tensor, eps: float = 1e-5) -> Tensor:
    """Mode-seeking regulariser of G (Mao et al., "Mode Seeking GANs for Diverse Image Synthesis", CVPR 2019, eq. 3):
    the two halves of the batch are pairs drawn with the same labels and different latents; the loss is the inverse
    of the image distance per latent distance, mean |G(z1) - G(z2)| / mean |z1 - z2|, so a generator that maps
    different latents of a class to one image pays for it."""
    return 1.0 / (_pair_distance(fake) / _pair_distance(z)).mean().add(eps)


def same_class_distance(x: Tensor, y: Tensor | None, max_items: int = 64) -> Tensor:
    """Mean absolute difference over the pairs with the same label among the first ``max_items`` of a batch of
    images or features (every pair when ``y`` is None): the within-class variety of real data, a scalar; NaN when
    the batch holds no such pair."""
    x, y = x[:max_items].flatten(1).float(), (y[:max_items] if y is not None else None)
    dist = torch.cdist(x, x, p=1) / x.shape[1]  # (n, n)
    same = torch.ones_like(dist, dtype=torch.bool) if y is None else y[:, None] == y[None, :]
    same = same.triu(diagonal=1)
    same = same.to(dist.dtype)
    return (dist * same).sum() / same.sum()  # 0 / 0 = NaN without a pair; no host read on a GPU


def diversity_match_reg(fake: Tensor, target: Tensor) -> Tensor:
    """Mode seeking bounded by the data (after the clipped diversity term of Yang et al., "Diversity-Sensitive
    Conditional GANs", ICLR 2019): ``fake`` holds same-label pairs from different latents (first half vs second
    half; images, or D's features of them); the loss is relu(1 - mean |f(z1) - f(z2)| / target), ``target`` being
    the same distance for real same-class pairs (:func:`same_class_distance`). G pays only while its samples of a
    class are closer together than real images of the class; a generator as varied as the data feels nothing, so
    the term cannot push samples past the data's variety (or out of their class) the way the unbounded inverse of
    :func:`mode_seeking_reg` can. No target yet (0): no loss."""
    # torch.where, not `if target > 0`: a host read would wait for the GPU; the clamp keeps the unused branch finite
    loss = torch.relu(1.0 - _pair_distance(fake).mean() / target.clamp_min(1e-12))
    return torch.where(target > 0, loss, torch.zeros_like(loss))


def get_losses(name: str) -> tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """(discriminator loss, generator loss) by name: 'hinge' or 'nonsaturating'."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None
