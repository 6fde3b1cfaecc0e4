"""Label-free and per-class diversity figures computed from feature rows: the *spread* and the *bins*.

These are the numbers that see a generator losing variety where FID may still look fine and a classifier's
accuracy certainly does; :class:`sagan.metrics.Evaluator` computes them beside torch-fidelity's metrics, on the
same features (the FID layer).

* *Spread* (``spread``, ``spread_min``): the mean pairwise feature distance between generated samples of a class,
  divided by the same for the real images of that class, averaged over classes (and its worst class); the whole
  set is one class for unconditional models. 1 = as varied as the data; a generator that draws one image per
  class goes towards 0.
* *Bins* (``ndb``, ``jsd``; Richardson & Weiss 2018, "On GANs and GMMs", as used by Mao et al. 2019): the real
  reference features are clustered once by k-means (:data:`NDB_BINS` bins, seeded, cached with the reference), each
  generated sample goes to its nearest centre, and ``ndb`` is the fraction of bins whose share of the generated
  samples differs from their share of the real ones (two-proportion z-test at :data:`NDB_ALPHA`); ``jsd`` is the
  Jensen-Shannon divergence (natural log) between the two bin histograms. Neither needs labels: a generator that
  drops whole kinds of image (mode dropping in unconditional models, which k-NN recall barely registers) empties
  their bins. Real held-out images drawn like the reference read about ``NDB_ALPHA`` or less (the digits: 0.00,
  JSD 0.007). Both depend on the number of samples, as FID does: compare at equal counts; NDB is the coarser one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

SPREAD_MAX_PER_CLASS = 1000  # samples per class that the spread figure looks at (pairwise distances: quadratic)
SPREAD_MAX_TOTAL = 50000  # ... and of the reference in all: with many classes (ImageNet: 1,000) fewer per class
NDB_BINS = 20  # k-means bins of the reference features (fewer when the reference has under 10 images per bin)
NDB_ALPHA = 0.05  # significance level of each bin's two-proportion test
NDB_FIT_MAX = 20000  # reference features k-means is fitted on (a seeded subset of larger sets)
NDB_SEED = 0  # the bins are a property of the reference set, not of an evaluation's seed


# ------------------------------------------------------------------------------------------------------ spread
def spread_per_class(num_classes: int) -> int:
    """How many reference images of each class the spread figure uses: :data:`SPREAD_MAX_PER_CLASS`, fewer when
    the classes together would exceed :data:`SPREAD_MAX_TOTAL` (the mean pairwise distance is unbiased at any n)."""
    return max(2, min(SPREAD_MAX_PER_CLASS, SPREAD_MAX_TOTAL // max(num_classes, 1)))


def spread_indices(labels: Tensor, num_classes: int) -> Tensor:
    """The reference rows the spread figure uses: the first :func:`spread_per_class` of each class, sorted."""
    per = spread_per_class(num_classes)
    return torch.cat([torch.nonzero(labels == c).flatten()[:per] for c in range(max(num_classes, 1))]).sort().values


def spread_by_class(ratios: Sequence[float] | None, names: Sequence[str]) -> dict[str, float]:
    """{class name: generated over real spread} of a conditional model's classes whose spread is finite, in label
    order; empty unless there are two classes or more and a name for each (see ``MetricsResult.spread_per_class``)."""
    if not ratios or len(ratios) != len(names) or len(names) < 2:
        return {}
    return {str(n): float(r) for n, r in zip(names, ratios) if math.isfinite(r)}


def least_varied(per_class: dict[str, float], n: int = 3) -> str:
    """'3 0.89, 2 0.93, 8 0.95': the ``n`` classes of lowest spread, lowest first."""
    return ", ".join(f"{name} {v:.2f}" for name, v in sorted(per_class.items(), key=lambda kv: kv[1])[:n])


def class_spread(features: Tensor, labels: Tensor, num_classes: int, max_per_class: int = SPREAD_MAX_PER_CLASS) -> Tensor:
    """Mean pairwise Euclidean distance between the features of each class (the first ``max_per_class`` samples
    of it): (num_classes,) float64, NaN for a class with fewer than 2 samples."""
    out = torch.full((num_classes,), float("nan"), dtype=torch.float64)
    for c in range(num_classes):
        f = features[labels == c][:max_per_class].double()
        n = len(f)
        if n >= 2:
            out[c] = torch.cdist(f, f).sum() / (n * (n - 1))
    return out


# -------------------------------------------------------------------------------------------------------- bins
def ndb_fit_indices(n: int, seed: int = NDB_SEED) -> Tensor:
    """The rows the k-means bins are fitted on, in the order k-means sees them: all of ``n`` up to
    :data:`NDB_FIT_MAX`, else a seeded subset of that size."""
    if n <= NDB_FIT_MAX:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:NDB_FIT_MAX]


def fit_bins(features: Tensor, num_bins: int = NDB_BINS, seed: int = NDB_SEED) -> Tensor | None:
    """k-means centres (K, D) of reference features (N, D) (scikit-learn, k-means++, seeded; fitted on at most
    :data:`NDB_FIT_MAX` of them), float32. K = ``num_bins``, capped at N // 10 so a bin holds ~10 real images;
    None when that leaves fewer than 2 bins."""
    from sklearn.cluster import KMeans

    k = min(num_bins, len(features) // 10)
    if k < 2:
        return None
    f = features if len(features) <= NDB_FIT_MAX else features[ndb_fit_indices(len(features), seed)]
    km = KMeans(n_clusters=k, init="k-means++", n_init=3, random_state=seed).fit(f.double().numpy())
    return torch.as_tensor(km.cluster_centers_, dtype=torch.float32)


def bin_counts(features: Tensor, centres: Tensor) -> Tensor:
    """How many of the features (N, D) fall nearest to each centre (K, D): (K,) long."""
    c = centres.double()
    nearest = torch.cat([torch.cdist(f.double(), c).argmin(dim=1) for f in features.split(10000)])  # (N,)
    return torch.bincount(nearest, minlength=len(centres))


def ndb_jsd(real: Tensor, generated: Tensor, alpha: float = NDB_ALPHA) -> tuple[float, float]:
    """NDB/K and JSD of two bin histograms (K,): the fraction of bins whose proportions differ at level ``alpha``
    (two-sided pooled two-proportion z-test, as Richardson & Weiss's ``ndb.py``), and the Jensen-Shannon divergence
    of the proportions in nats (0 = the same, ln 2 = disjoint)."""
    from scipy.stats import norm

    n1, n2 = float(real.sum()), float(generated.sum())
    p1, p2 = real.double() / n1, generated.double() / n2
    pooled = (real + generated).double() / (n1 + n2)
    se = torch.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    z = (p1 - p2).abs() / se.clamp_min(1e-12)
    different = (z > norm.ppf(1 - alpha / 2)) & (se > 0)
    m = (p1 + p2) / 2

    def kl(p: Tensor) -> Tensor:
        return torch.where(p > 0, p * torch.log(p / m), torch.zeros_like(p)).sum()

    return float(different.double().mean()), float((kl(p1) + kl(p2)) / 2)

