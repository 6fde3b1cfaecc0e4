"""Sample-quality metrics through torch-fidelity: FID (Heusel et al. 2017), IS (Salimans et al. 2016), KID
(Binkowski et al. 2018), precision and recall (Kynkaanniemi et al. 2019), and a per-class spread figure.

* :func:`to_uint8` is the one place where generator output becomes what metrics see: uint8 (B, 3, H, W),
  grayscale repeated to three channels.
* :class:`Evaluator` builds torch-fidelity's feature extractor once, extracts features of the reference set once
  (cached on disk under a name that holds the data set, split, resolution, channels, a fingerprint of the data and
  the hash of the extractor's weights, so a stale entry is never reused), then scores generators or image sets from
  their features with torch-fidelity's own metric functions. Under ``torch.distributed`` every rank generates and
  extracts its contiguous share of the samples (sample i's latent and label depend only on (seed, i)), the features
  are gathered, and every rank computes the same numbers: identical to one process up to float rounding, with no
  rank idling inside a collective while another works.
* *Spread* (``spread``, ``spread_min``) and *bins* (``ndb``, ``jsd``): the diversity figures of
  :mod:`sagan.diversity`, computed here on the same features, which see a generator losing variety where FID may
  still look fine.
* *Class labels of generated samples* (conditional models): each class as often as in the reference set
  (:func:`generated_labels`: the reference's class frequencies, rounded to the sample count, in a seeded order), so
  a perfect class-conditional generator scores like the data on an imbalanced set too, and no class's share moves
  with the seed.
* :func:`compute_metrics` compares two image folders through ``torch_fidelity.calculate_metrics``.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from torch_fidelity import calculate_metrics

from . import features
from .diversity import (NDB_ALPHA, bin_counts, class_spread, fit_bins, ndb_fit_indices, ndb_jsd, spread_indices,
                        spread_per_class)
from .errors import SaganError, SaganWarning, write_failure_reason
from .files import atomic_file, user_path

INCEPTION = "inception-v3-compat"
WEIGHTS_ENV = "SAGAN_INCEPTION_WEIGHTS"
METRIC_NAMES = ("fid", "isc", "kid", "prc")
# torch-fidelity result keys -> our short names
_RESULT_KEYS = {
    "frechet_inception_distance": "fid",
    "inception_score_mean": "isc",
    "inception_score_std": "isc_std",
    "kernel_inception_distance_mean": "kid",
    "kernel_inception_distance_std": "kid_std",
    "precision": "precision",
    "recall": "recall",
    "f_score": "f_score",
}
# real images whose features KID and precision/recall compare with, and whose bin counts NDB and JSD use (a seeded
# subset of larger reference sets; FID's moments use every image): precision/recall's k-NN radii need the real-real
# distances, quadratic in this count (ImageNet's 1.28M: 1.6e12 pairs, 10 GB of features; 50k: seconds on a GPU).
# The bins are counted on the same rows because their centres exist only after the one pass over the set; 50,000
# real images leave each bin's share a standard error of at most 0.0023, small next to the generated side's.
REFERENCE_FEATURES_MAX = 50000
REFERENCE_FEATURES_SEED = 0


def reference_subset_indices(n: int) -> Tensor:
    """Which of ``n`` reference images KID and precision/recall use: all of them up to
    :data:`REFERENCE_FEATURES_MAX`, else a seeded subset of that size, in the original order (the same rows for the
    same reference, however often or on however many ranks it is computed)."""
    if n <= REFERENCE_FEATURES_MAX:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(REFERENCE_FEATURES_SEED))[
        :REFERENCE_FEATURES_MAX].sort().values


def reference_subset(features: Tensor) -> Tensor:
    """The rows of reference ``features`` (N, D) that KID and precision/recall use
    (:func:`reference_subset_indices`)."""
    return features if len(features) <= REFERENCE_FEATURES_MAX else features[reference_subset_indices(len(features))]


class MetricsError(SaganError):
    """Metrics cannot be computed as asked (weights missing, too few images, ...)."""


def to_uint8(images: Tensor) -> Tensor:
    """Generator output in [-1, 1], (B, C, H, W) with C in {1, 3} -> uint8 (B, 3, H, W), values round(x01 * 255)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
    x = ((images.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x  # (B, 3, H, W)


class UInt8Images(Dataset):
    """A data set of (image in [-1, 1], label) pairs seen as uint8 (3, H, W) images, as torch-fidelity wants;
    ``with_labels=True`` serves (uint8 image, label) pairs (label 0 for unlabelled data)."""

    def __init__(self, dataset: Dataset, with_labels: bool = False) -> None:
        self.dataset, self.with_labels = dataset, with_labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Tensor | tuple[Tensor, int]:
        item = self.dataset[i]
        img = item[0] if isinstance(item, (tuple, list)) else item
        if img.dtype != torch.uint8:
            img = to_uint8(img.unsqueeze(0))[0]
        elif img.shape[0] == 1:
            img = img.expand(3, -1, -1).contiguous()
        if not self.with_labels:
            return img
        label = int(item[1]) if isinstance(item, (tuple, list)) and len(item) > 1 else 0
        return img, label


# ------------------------------------------------------------------------------------------- feature extractors
def sha256_file(path: str | os.PathLike, length: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def inception_hub_path() -> Path:
    """Where torch-fidelity's download of the InceptionV3 weights lands (torch hub's checkpoint folder)."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]


@dataclass
class FeatureSpec:
    """A resolved feature extractor: torch-fidelity name, weights file (None = packaged / download) and its hash."""

    name: str
    weights_path: str | None
    weights_sha256: str
    layers: dict[str, str] = field(default_factory=dict)


def resolve_feature_extractor(name: str = INCEPTION, weights_path: str | None = None) -> FeatureSpec:
    """Check that the feature extractor's weights can be had, before anything heavy runs.

    ``inception-v3-compat`` takes its weights from ``weights_path``, else ``$SAGAN_INCEPTION_WEIGHTS``, else torch
    hub's cache, else torch-fidelity's download; ``digits-mlp`` uses the weights shipped with the package.
    """
    features.register()
    if name == features.DIGITS_FEATURE_EXTRACTOR:
        path = weights_path or str(features.DIGITS_WEIGHTS)
        if not Path(path).is_file():
            raise MetricsError(f"digits feature-extractor weights {path!r} do not exist")
        return FeatureSpec(name, path, sha256_file(path))
    if name != INCEPTION:
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        if name not in FEATURE_EXTRACTORS_REGISTRY:
            raise MetricsError(
                f"unknown feature extractor {name!r}: use {INCEPTION!r} (comparable FID) or "
                f"{features.DIGITS_FEATURE_EXTRACTOR!r} (digits demo), or one registered with torch-fidelity"
            )
        return FeatureSpec(name, weights_path, sha256_file(weights_path) if weights_path else "download")
    path = weights_path or os.environ.get(WEIGHTS_ENV) or None
    path = user_path(path) if path else None
    hub = inception_hub_path()
    if path is not None:
        if not Path(path).is_file():
            raise MetricsError(
                f"InceptionV3 weights file {path!r} does not exist: put the file '{hub.name}' there, or point "
                f"the feature-extractor weights path (or ${WEIGHTS_ENV}) at it"
            )
        _check_weights_file(path)
        return FeatureSpec(name, str(path), sha256_file(path))
    if hub.is_file():
        return FeatureSpec(name, str(hub), sha256_file(hub))
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        hub.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(URL_INCEPTION_V3, str(hub), progress=False)
    except Exception as e:  # noqa: BLE001 - any download failure gets the same instructions
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        raise MetricsError(
            f"the InceptionV3 weights for FID/IS/KID are not on this machine and could not be downloaded "
            f"({type(e).__name__}). Download {URL_INCEPTION_V3} on a machine with internet and put it at {hub}, "
            f"or anywhere and set ${WEIGHTS_ENV} (or the weights-path option) to its path"
        ) from None
    return FeatureSpec(name, str(hub), sha256_file(hub))


def _check_weights_file(path: str) -> None:
    """Refuse weights files that are not plain tensors (torch-fidelity itself loads them with weights_only=False)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise MetricsError(
            f"InceptionV3 weights file {path!r} is not a plain state dict of tensors ({type(e).__name__}): "
            "use torch-fidelity's 'weights-inception-2015-12-05-6726825d.pth'"
        ) from None
    if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise MetricsError(f"{path!r} does not hold InceptionV3 weights for torch-fidelity's inception-v3-compat")


def _layer_dim(layer: str) -> int | None:
    return int(layer) if re.fullmatch(r"\d+", layer) else None


# ---------------------------------------------------------------------------------------------------- compute
@dataclass
class MetricsResult:
    """Metric values and the protocol they were measured under."""

    values: dict[str, float]
    protocol: dict[str, Any]
    #: generated over real within-class spread per class label (NaN where a class has fewer than two images on
    #: either side); ``spread`` is its mean over the finite entries, ``spread_min`` their minimum
    spread_per_class: list[float] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_metrics(metrics: str | Sequence[str]) -> list[str]:
    names = [m.strip().lower() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    names = ["isc" if m in ("is", "inception_score") else m for m in names]
    bad = [m for m in names if m not in METRIC_NAMES]
    if bad or not names:
        raise MetricsError(f"unknown metric(s) {bad or metrics!r}: choose from {', '.join(METRIC_NAMES)}")
    return list(dict.fromkeys(names))


def compute_metrics(
    input1: str | Dataset,
    input2: str | Dataset | None,
    *,
    metrics: str | Sequence[str] = ("fid",),
    feature_extractor: FeatureSpec | str = INCEPTION,
    fid_layer: str | None = None,
    seed: int = 0,
    batch_size: int = 100,
    device: str | torch.device | None = None,
    kid_subset_size: int = 1000,
    isc_splits: int = 10,
    allow_few_samples: bool = False,
    verbose: bool = False,
) -> MetricsResult:
    """FID / IS / KID / precision-recall of ``input1`` against ``input2``: image folders (or Datasets of uint8
    images) through ``torch_fidelity.calculate_metrics``. Generators are scored by :class:`Evaluator`."""
    names = parse_metrics(metrics)
    spec = feature_extractor if isinstance(feature_extractor, FeatureSpec) else resolve_feature_extractor(feature_extractor)
    binary = [m for m in names if m != "isc"]
    if binary and input2 is None:
        raise MetricsError(f"{', '.join(binary)} compare two sets: a reference set is needed")
    device = _device(device)
    layers = _layers(spec, names, fid_layer)
    n1, n2 = count_images(input1), (count_images(input2) if input2 is not None else None)
    _check_counts(names, layers, {"first": n1, "second": n2}, isc_splits, allow_few_samples,
                  advice={"first": "give it at least {dim} images", "second": "give it at least {dim} images"},
                  provided=_provided_layers(spec))
    kid_size = min(kid_subset_size, n1, n2 or n1)
    try:
        raw = calculate_metrics(
            input1=input1, input2=input2, cuda=device.type == "cuda", batch_size=batch_size,
            isc="isc" in names, fid="fid" in names, kid="kid" in names, prc="prc" in names,
            feature_extractor=spec.name, feature_extractor_weights_path=spec.weights_path,
            feature_layer_fid=layers.get("fid"), feature_layer_kid=layers.get("kid"),
            feature_layer_prc=layers.get("prc"), cache=False, rng_seed=seed, kid_subset_size=kid_size,
            isc_splits=isc_splits, save_cpu_ram=True, samples_find_deep=True, verbose=verbose,
        )
    except ValueError as e:  # torch-fidelity's assertions
        raise MetricsError(f"torch-fidelity refused the inputs: {e}") from None
    values = {_RESULT_KEYS.get(k, k): float(v) for k, v in raw.items()}
    protocol = _protocol(spec, names, layers, seed, kid_size, isc_splits, allow_few_samples)
    protocol.update(num_input1=n1, num_input2=n2)
    return MetricsResult(values, protocol)


def _device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _layers(spec: FeatureSpec, names: list[str], fid_layer: str | None) -> dict[str, str]:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    cls = FEATURE_EXTRACTORS_REGISTRY[spec.name]
    provided = _provided_layers(spec)
    if fid_layer is not None and str(fid_layer) not in provided:
        raise MetricsError(f"feature layer {fid_layer!r} is not one that {spec.name} provides: choose one of "
                           f"{', '.join(provided)} (--fid-layer, or fid.fid_layer in training), or leave it unset "
                           "for the extractor's default")
    return {m: (fid_layer if (fid_layer and m in ("fid", "kid", "prc")) else cls.get_default_feature_layer_for_metric(m))
            for m in names}


def _provided_layers(spec: FeatureSpec) -> list[str]:
    """The extractor's layers, largest first (``2048, 768, 192, 64, logits_unbiased`` for InceptionV3)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    provided = [str(f) for f in FEATURE_EXTRACTORS_REGISTRY[spec.name].get_provided_features_list()]
    return sorted(provided, key=lambda f: -(_layer_dim(f) or 0))


def _protocol(spec: FeatureSpec, names: list[str], layers: dict[str, str], seed: int, kid_size: int,
              isc_splits: int, allow_few: bool) -> dict[str, Any]:
    return {
        "metrics": names,
        "feature_extractor": spec.name,
        "feature_layers": layers,
        "feature_extractor_weights_sha256": spec.weights_sha256,
        "seed": seed,
        "kid_subset_size": kid_size if "kid" in names else None,
        "isc_splits": isc_splits if "isc" in names else None,
        "prc_neighborhood": PRC_NEIGHBORHOOD if "prc" in names else None,
        "allow_few_samples": allow_few,
        "torch_fidelity": _tf_version(),
        "torch": torch.__version__,  # the kernels that drew the samples and the features round as this version does
    }


# ------------------------------------------------------------------------------------------------ distributed
def dist_info() -> tuple[int, int]:
    """(rank, world size) of the initialised ``torch.distributed`` group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(n: int, rank: int, world: int) -> range:
    """The contiguous block of ``range(n)`` that ``rank`` handles; the blocks of all ranks cover it in order."""
    return range(rank * n // world, (rank + 1) * n // world)


def gather_rows(t: Tensor) -> Tensor:
    """Concatenate every rank's (n_r, ...) tensor in rank order, on every rank (CPU result); identity alone."""
    import torch.distributed as dist

    rank, world = dist_info()
    if world == 1:
        return t.cpu()
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = t.to(dev).contiguous()
    n = torch.tensor([t.shape[0]], device=dev, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(c.item()) for c in sizes]
    padded = torch.zeros((max(counts), *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]).cpu()


def generated_labels(num_samples: int, num_classes: int, class_counts: Tensor | None, gen: torch.Generator) -> Tensor:
    """Class labels (N,) of ``num_samples`` generated samples: class c exactly ``N * share_c`` times, rounded by
    largest remainder (ties to the lower class), where the shares are the reference set's class frequencies
    (``class_counts`` (K,); equal shares without them), in an order drawn from ``gen``. Zeros when unconditional."""
    if num_classes == 0:
        return torch.zeros(num_samples, dtype=torch.long)
    if class_counts is not None and len(class_counts) == num_classes and int(class_counts.sum()) > 0:
        share = class_counts.double() / class_counts.sum()
    else:
        share = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
    quota = num_samples * share  # (K,)
    count = quota.floor().long()
    rest = num_samples - int(count.sum())
    order = sorted(range(num_classes), key=lambda c: (-(quota[c] - count[c]).item(), c))
    count[order[:rest]] += 1
    labels = torch.repeat_interleave(torch.arange(num_classes), count)  # (N,)
    return labels[torch.randperm(num_samples, generator=gen)]


def all_reduce_sum(t: Tensor) -> Tensor:
    """The sum of every rank's ``t`` (same shape on all), on every rank (CPU result); identity alone."""
    import torch.distributed as dist

    if dist_info()[1] == 1:
        return t.cpu()
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = t.to(dev).contiguous()
    dist.all_reduce(t)
    return t.cpu()


# ---------------------------------------------------------------------------------------------------- scoring
PRC_NEIGHBORHOOD = 3


class StreamingMoments:
    """Mean and scatter matrix (sum of outer products of deviations) of feature rows, in float64, one batch at a
    time (the pairwise update of Chan, Golub & LeVeque 1979: each batch's own two-pass moments, merged), so the
    rows need not be held; :meth:`merged` combines the ranks' moments the same way."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: Tensor | None = None  # (D,)
        self.scatter: Tensor | None = None  # (D, D)

    def add(self, f: Tensor) -> None:
        """Add rows (B, D)."""
        b = len(f)
        if b == 0:
            return
        f = f.double()
        mean_b = f.mean(dim=0)
        x = f - mean_b
        if self.mean is None:
            self.n, self.mean, self.scatter = b, mean_b, x.T @ x
            return
        n = self.n + b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (b / n)
        self.scatter.addmm_(x.T, x).addr_(delta, delta, alpha=self.n * b / n)
        self.n = n

    def merged(self) -> tuple[Tensor, Tensor]:
        """Mean (D,) and unbiased covariance (D, D) over every rank's rows (CPU, float64). Every rank must hold
        at least one row."""
        if self.mean is None:
            raise MetricsError("no reference images on this process: use at least as many images as processes")
        mean, scatter = self.mean.cpu(), self.scatter.cpu()
        if dist_info()[1] > 1:
            n = float(all_reduce_sum(torch.tensor([float(self.n)], dtype=torch.float64))[0])
            total_mean = all_reduce_sum(mean * self.n) / n
            delta = mean - total_mean
            scatter = all_reduce_sum(scatter + torch.outer(delta, delta) * self.n)
            return total_mean, scatter / max(n - 1, 1)
        return mean, scatter / max(self.n - 1, 1)


class ReferenceStream:
    """One rank's pass over its shard of the reference set, holding only what the statistics need: per layer
    :class:`StreamingMoments` and the feature rows some statistic reads. These are the ``fixed`` rows, chosen by
    index alone (the bins' fit and the KID / precision-recall subset), and this rank's first
    :func:`spread_per_class` rows of each class (the spread takes the first of each class over all ranks, which
    are among them). So a rank holds at most about ``NDB_FIT_MAX + REFERENCE_FEATURES_MAX + SPREAD_MAX_TOTAL``
    rows, whatever the size of the set."""

    def __init__(self, num_classes: int, fixed: Tensor) -> None:
        self.conditional, self.k = num_classes > 0, max(num_classes, 1)
        self.fixed = fixed  # (N,) bool over the whole set
        self.per = spread_per_class(num_classes)
        self.seen = torch.zeros(self.k, dtype=torch.long)  # rows of each class this rank has read
        self.moments: dict[str, StreamingMoments] = {}
        self._rows: dict[str, list[Tensor]] = {}
        self._index: list[Tensor] = []
        self._labels: list[Tensor] = []
        self._candidate: list[Tensor] = []
        self.held = 0  # rows held per layer

    def add(self, start: int, labels: Tensor, feats: dict[str, Tensor]) -> None:
        """Rows ``start`` .. ``start + B - 1`` of the set: labels (B,) and features (B, D) per layer."""
        b = len(labels)
        index = torch.arange(start, start + b)
        lab = labels.long() if self.conditional else torch.zeros(b, dtype=torch.long)
        onehot = torch.nn.functional.one_hot(lab, self.k)  # (B, K)
        nth = (onehot.cumsum(0) * onehot).sum(1) - 1  # (B,): how many of its class came before it in the batch
        candidate = self.seen[lab] + nth < self.per
        self.seen += onehot.sum(0)
        keep = candidate | self.fixed[index]
        keep_dev = None
        for layer, f in feats.items():
            self.moments.setdefault(layer, StreamingMoments()).add(f)
            keep_dev = keep.to(f.device) if keep_dev is None else keep_dev
            self._rows.setdefault(layer, []).append(f[keep_dev].cpu())
        self._index.append(index[keep])
        self._labels.append(lab[keep])
        self._candidate.append(candidate[keep])
        self.held += int(keep.sum())

    def held_rows(self) -> tuple[Tensor, Tensor, Tensor]:
        """Global index (M,), label (M,) and whether a spread candidate (M,) of the rows held, ascending."""
        def cat(parts: list[Tensor], dtype: torch.dtype) -> Tensor:
            return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)

        return cat(self._index, torch.long), cat(self._labels, torch.long), cat(self._candidate, torch.bool)

    def rows(self, layer: str) -> Tensor:
        """The rows held of ``layer`` (M, D), in the order of :meth:`held_rows`."""
        return torch.cat(self._rows[layer])


@dataclass
class Reference:
    """What metrics need of the reference set, per feature layer: mean and covariance (FID), the features
    themselves when KID or precision/recall ask for them, and, on the spread layer, the per-class spread and the
    k-means bins with the count in each of the reference rows KID / precision-recall use (all of a set of up to
    :data:`REFERENCE_FEATURES_MAX`; ``ndb``, ``jsd``; None when the set is too small for bins)."""

    count: int
    num_classes: int
    stats: dict[str, dict[str, Tensor]]
    spread: Tensor
    bins: Tensor | None = None
    bin_counts: Tensor | None = None
    class_counts: Tensor | None = None  # (K,) images of each class in the whole set (conditional references)


class Evaluator:
    """Scores generators and image sets against one reference set, from features (see the module docstring).

    Args:
        feature_extractor: a resolved :class:`FeatureSpec` or a torch-fidelity extractor name.
        metrics: subset of fid, isc, kid, prc (comma-separated or a list).
        fid_layer: feature layer for FID / KID / PR (None = the extractor's default, 2048 for Inception).
        device: where generation and feature extraction run (default: the current CUDA device, else CPU).
        batch_size: images per generator / extractor call.
        allow_few_samples: score FID / KID / PR on fewer images than feature dimensions (biased; recorded).
        progress: show progress bars (rank 0 only).
    """

    def __init__(
        self,
        feature_extractor: FeatureSpec | str = INCEPTION,
        metrics: str | Sequence[str] = ("fid", "prc"),
        fid_layer: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 100,
        kid_subset_size: int = 1000,
        isc_splits: int = 10,
        allow_few_samples: bool = False,
        progress: bool = False,
    ) -> None:
        from torch_fidelity.utils import create_feature_extractor

        self.names = parse_metrics(metrics)
        self.spec = feature_extractor if isinstance(feature_extractor, FeatureSpec) else \
            resolve_feature_extractor(feature_extractor)
        self.layers = _layers(self.spec, self.names, fid_layer)
        self.spread_layer = self.layers.get("fid") or _layers(self.spec, ["fid"], fid_layer)["fid"]
        self.device = _device(device)
        self.batch_size, self.kid_subset_size, self.isc_splits = batch_size, kid_subset_size, isc_splits
        self.allow_few_samples, self.progress = allow_few_samples, progress
        wanted = sorted(set(self.layers.values()) | {self.spread_layer})
        self.extractor = create_feature_extractor(self.spec.name, wanted, cuda=False,
                                                  feature_extractor_weights_path=self.spec.weights_path,
                                                  verbose=False).to(self.device)
        self.reference: Reference | None = None

    # --------------------------------------------------------------------------------------- features
    @torch.no_grad()
    def _extract(self, imgs: Tensor) -> dict[str, Tensor]:
        """Features per layer of a uint8 batch (B, 3, H, W): float32 (B, D) on :attr:`device`."""
        feats = self.extractor.convert_features_tuple_to_dict(self.extractor(imgs.to(self.device)))
        return {k: v.detach().float() for k, v in feats.items()}

    def _progress(self, total: int, desc: str) -> Any:
        """Rank 0's progress over ``total`` images that all ranks share: it counts rank 0's shard, so that it ends
        at 100%."""
        from .progress import progress

        rank, world = dist_info()
        if world > 1:
            desc, total = f"{desc} (rank 0's share of {total})", len(shard(total, 0, world))
        return progress(total, desc, "img", disable=not self.progress or rank != 0)

    @torch.no_grad()
    def _features(self, uint8_batches: Any, total: int, desc: str) -> dict[str, Tensor]:
        """Features (N, D) per layer of every rank's batches, gathered in rank order (CPU)."""
        out: dict[str, list[Tensor]] = {}
        with self._progress(total, desc) as bar:
            for imgs in uint8_batches:
                for k, v in self._extract(imgs).items():
                    out.setdefault(k, []).append(v.cpu())
                bar.update(len(imgs))
        return {k: gather_rows(torch.cat(v)) for k, v in out.items()}

    def _dataset_batches(self, dataset: Dataset, num_workers: int = 0) -> Iterator[tuple[int, Tensor, Tensor]]:
        """This rank's :func:`shard` of ``dataset`` as (index of the batch's first image in ``dataset``, uint8
        images (B, 3, H, W), labels (B,)) batches, in order."""
        from torch.utils.data import DataLoader, Subset

        rank, world = dist_info()
        mine = shard(len(dataset), rank, world)
        start = mine.start
        for imgs, y in DataLoader(Subset(UInt8Images(dataset, with_labels=True), mine),
                                  batch_size=self.batch_size, num_workers=num_workers):
            yield start, imgs, torch.as_tensor(y)
            start += len(imgs)

    def _dataset_features(self, dataset: Dataset, desc: str, num_workers: int = 0) -> tuple[dict[str, Tensor], Tensor]:
        """Features (N, D) per layer and labels (N,) of ``dataset``, each rank extracting its shard."""
        labels: list[Tensor] = []

        def batches():
            for _, imgs, y in self._dataset_batches(dataset, num_workers):
                labels.append(y)
                yield imgs

        feats = self._features(batches(), len(dataset), desc)
        return feats, gather_rows(torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long))

    # -------------------------------------------------------------------------------------- reference
    def _cache_path(self, root: str | None, name: str, layer: str) -> Path:
        base = Path(root) if root else Path(torch.hub.get_dir()).parent / "fidelity_cache"
        return base / f"{name}-{self.spec.name}-{layer}.sagan.pt"

    def load_reference(self, dataset: Dataset, num_classes: int = 0, cache_name: str | None = None,
                       cache_root: str | None = None, num_workers: int = 0) -> Reference:
        """Statistics of the reference set, from the cache when there (then ``dataset`` is not read), else
        extracted (all ranks sharing the work) and written to the cache by rank 0."""
        need_features = {self.layers[m] for m in ("kid", "prc") if m in self.names}
        layers = sorted({self.layers[m] for m in self.names if m != "isc"} | {self.spread_layer})
        cached: dict[str, dict[str, Tensor]] = {}
        if cache_name:
            for layer in layers:
                path = self._cache_path(cache_root, cache_name, layer)
                try:
                    entry = torch.load(path, map_location="cpu", weights_only=True)
                except (OSError, RuntimeError, EOFError, ValueError):
                    break
                if layer in need_features and entry.get("features") is None:
                    break
                if entry.get("features") is not None:  # written before the cap, or under another cap
                    entry["features"] = reference_subset(entry["features"])
                if layer == self.spread_layer and "bins" not in entry:  # written before the bins existed
                    break
                if layer == self.spread_layer and num_classes and entry.get("class_counts") is None:
                    break  # written before the class counts were kept
                cached[layer] = entry
        if len(cached) == len(layers):
            stats = cached
        else:
            stats = self._reference_stats(dataset, num_classes, layers, need_features, num_workers)
            if cache_name and dist_info()[0] == 0:
                for layer, entry in stats.items():
                    path = self._cache_path(cache_root, cache_name, layer)
                    try:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        with atomic_file(path) as f:
                            torch.save(entry, f)
                    except (OSError, RuntimeError) as e:  # torch's writer drops the errno: RuntimeError
                        # the cache only saves time: evaluate without it
                        why = write_failure_reason(e, path.parent)
                        warnings.warn(f"could not cache the reference statistics in {str(path.parent)!r}: {why}. "
                                      "Evaluating without the cache; the next run computes them again",
                                      SaganWarning, stacklevel=2)
                        break
        count = int(stats[layers[0]]["count"])
        sl = stats[self.spread_layer]
        self.reference = Reference(count, num_classes, stats, sl["spread"], sl.get("bins"), sl.get("bin_counts"),
                                   sl.get("class_counts"))
        return self.reference

    def _reference_stats(self, dataset: Dataset, num_classes: int, layers: list[str], need_features: set[str],
                         num_workers: int) -> dict[str, dict[str, Tensor]]:
        """The reference statistics of every layer in one streaming pass: each rank reads its shard and holds only
        running moments and the rows some statistic reads (:class:`ReferenceStream`: at most about 120,000 rows,
        however large the set; ImageNet's 1.28M x 2048 features would be 10 GB). The moments are merged over
        ranks, and only the kept rows are gathered. Any number of ranks gives one process's numbers (the moments
        up to float rounding)."""
        n, world = len(dataset), dist_info()[1]
        if n < world:  # every rank's moments need a row (checked on all ranks alike: none waits in a collective)
            raise MetricsError(f"the reference set has {n} images, fewer than the {world} processes sharing it: "
                               "use a larger reference set")
        fit_idx, feature_idx = ndb_fit_indices(n), reference_subset_indices(n)
        fixed = torch.zeros(n, dtype=torch.bool)
        fixed[fit_idx] = True
        fixed[feature_idx] = True
        stream = ReferenceStream(num_classes, fixed)
        with self._progress(n, "reference features") as bar:
            for start, imgs, y in self._dataset_batches(dataset, num_workers):
                stream.add(start, y, self._extract(imgs))
                bar.update(len(imgs))
        index, labels, candidate = stream.held_rows()
        # the spread reads the first rows of each class over all ranks: chosen among every rank's candidates
        cand_idx, cand_lab = gather_rows(index[candidate]), gather_rows(labels[candidate])
        first = spread_indices(cand_lab, num_classes)
        spread_idx, spread_lab = cand_idx[first], cand_lab[first]
        keep = fixed[index] | torch.isin(index, spread_idx)
        kept = gather_rows(index[keep])  # (kept,) global indices, ascending (ranks hold contiguous blocks)

        def rows_of(idx: Tensor) -> Tensor:
            return torch.searchsorted(kept, idx)

        k = max(num_classes, 1)
        stats = {}
        for layer in layers:
            mu, sigma = stream.moments[layer].merged()
            rows = gather_rows(stream.rows(layer)[keep])  # (kept, D)
            stats[layer] = {"mu": mu, "sigma": sigma, "count": torch.tensor(n),
                            "spread": class_spread(rows[rows_of(spread_idx)], spread_lab, k),
                            "features": rows[rows_of(feature_idx)] if layer in need_features else None}
            if layer == self.spread_layer:
                bins = fit_bins(rows[rows_of(fit_idx)])  # at most NDB_FIT_MAX rows, in the order k-means sees them
                counts = bin_counts(rows[rows_of(feature_idx)], bins) if bins is not None else None
                stats[layer].update(bins=bins, bin_counts=counts,
                                    class_counts=all_reduce_sum(stream.seen) if num_classes else None)
        return stats

    # ---------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def generator(self, g: nn.Module, num_samples: int, seed: int = 0) -> MetricsResult:
        """Score ``num_samples`` images of generator ``g`` (run as it is: put it in eval mode first). Sample i's
        latent and class label are row i of one seeded draw, whichever rank generates it; the labels follow the
        reference set's class frequencies (:func:`generated_labels`)."""
        if num_samples is None or num_samples < 1:
            raise MetricsError(f"the number of generated samples must be a positive integer, got {num_samples}")
        self._check(num_samples)
        k = int(getattr(g, "num_classes", 0))
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(num_samples, g.z_dim, generator=gen)  # (N, z_dim): the same on every rank
        ref = self.reference
        counts = ref.class_counts if ref is not None and ref.num_classes == k else None
        y = generated_labels(num_samples, k, counts, gen)  # (N,)
        rank, world = dist_info()
        mine = shard(num_samples, rank, world)
        dev = next(g.parameters()).device

        def batches():
            for s in range(mine.start, mine.stop, self.batch_size):
                e = min(s + self.batch_size, mine.stop)
                yield to_uint8(g(z[s:e].to(dev), y[s:e].to(dev) if k > 0 else None))

        feats = self._features(batches(), num_samples, "generating")
        result = self._score(feats, y, k, seed)
        result.protocol.update(num_generated=num_samples, generated_labels=(
            None if k == 0 else "reference class frequencies" if counts is not None else "equal shares"))
        return result

    def images(self, dataset: Dataset, num_classes: int = 0, seed: int = 0, num_workers: int = 0) -> MetricsResult:
        """Score a set of real images (e.g. the held-out split: the floor a perfect model would reach)."""
        self._check(len(dataset))
        feats, labels = self._dataset_features(dataset, "images", num_workers)
        result = self._score(feats, labels, num_classes, seed)
        result.protocol.update(num_images=len(dataset))
        return result

    def _check(self, n: int) -> None:
        """Refuse ``n`` generated images (or the loaded reference) when they are too few for the metrics."""
        if self.reference is None and any(m != "isc" for m in self.names):
            raise MetricsError("load_reference() first: FID, KID and precision/recall compare with a reference set")
        self.check_counts({"generated": n, "reference": self.reference.count if self.reference else None})

    def check_counts(self, counts: dict[str, int | None], advice: dict[str, str] | None = None,
                     layer_flag: str = "--fid-layer", allow_flag: str | None = "--allow-few-samples") -> None:
        """Refuse sets too small for the metrics before anything is read or generated: ``counts`` maps a set's
        name (``generated``, ``reference``, ...; IS's splits apply to the generated set) to its number of images
        (None: not used). The error's fix names the command's flags: ``advice`` (by set; ``{dim}`` the number
        needed; by default ``--num-samples`` for the generated set), ``layer_flag`` and ``allow_flag``."""
        _check_counts(self.names, self.layers, counts, self.isc_splits, self.allow_few_samples,
                      advice if advice is not None else {"generated": "raise --num-samples to at least {dim}"},
                      _provided_layers(self.spec), layer_flag, allow_flag)

    def _score(self, feats: dict[str, Tensor], labels: Tensor, num_classes: int, seed: int) -> MetricsResult:
        from torch_fidelity.metric_fid import fid_statistics_to_metric
        from torch_fidelity.metric_isc import isc_features_to_metric
        from torch_fidelity.metric_kid import kid_features_to_metric
        from torch_fidelity.metric_prc import prc_features_to_metric

        ref = self.reference
        values: dict[str, float] = {}
        n = len(labels)
        by_features = next((m for m in ("kid", "prc") if m in self.names), None)
        n_ref = len(ref.stats[self.layers[by_features]]["features"]) if ref and by_features else None  # real rows
        kid_size = min(self.kid_subset_size, n, n_ref or n)
        if "fid" in self.names:
            mu, sigma = _moments(feats[self.layers["fid"]])
            r = ref.stats[self.layers["fid"]]
            out = fid_statistics_to_metric({"mu": mu.numpy(), "sigma": sigma.numpy()},
                                           {"mu": r["mu"].numpy(), "sigma": r["sigma"].numpy()}, False)
            values["fid"] = float(out["frechet_inception_distance"])
        if "isc" in self.names:
            out = isc_features_to_metric(feats[self.layers["isc"]], splits=self.isc_splits, shuffle=True, rng_seed=seed)
            values.update(isc=float(out["inception_score_mean"]), isc_std=float(out["inception_score_std"]))
        if "kid" in self.names:
            out = kid_features_to_metric(feats[self.layers["kid"]], ref.stats[self.layers["kid"]]["features"],
                                         kid_subset_size=kid_size, rng_seed=seed, verbose=False)
            values.update(kid=float(out["kernel_inception_distance_mean"]),
                          kid_std=float(out["kernel_inception_distance_std"]))
        if "prc" in self.names:
            f1 = feats[self.layers["prc"]].to(self.device)
            f2 = ref.stats[self.layers["prc"]]["features"].to(self.device)
            out = prc_features_to_metric(f1, f2, prc_neighborhood=PRC_NEIGHBORHOOD, prc_batch_size=10000,
                                         save_cpu_ram=False, verbose=False)
            values.update(precision=float(out["precision"]), recall=float(out["recall"]))
        if ref is not None:
            k = max(ref.num_classes, 1)
            lab = labels if (ref.num_classes and num_classes == ref.num_classes) else torch.zeros_like(labels)
            per_class = class_spread(feats[self.spread_layer], lab, k) / ref.spread  # (K,)
            ratio = per_class[torch.isfinite(per_class)]
            if len(ratio):
                values.update(spread=float(ratio.mean()), spread_min=float(ratio.min()))
            if ref.bins is not None:
                ndb, jsd = ndb_jsd(ref.bin_counts, bin_counts(feats[self.spread_layer], ref.bins))
                values.update(ndb=ndb, jsd=jsd)
        protocol = _protocol(self.spec, self.names, self.layers, seed, kid_size, self.isc_splits,
                             self.allow_few_samples)
        protocol.update(num_reference=ref.count if ref else None,
                        num_reference_features=n_ref,
                        spread_layer=self.spread_layer,
                        ndb_bins=len(ref.bins) if ref is not None and ref.bins is not None else None,
                        ndb_alpha=NDB_ALPHA,
                        world_size=dist_info()[1])
        return MetricsResult(values, protocol, per_class.tolist() if ref is not None else None)


def _moments(f: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    f = f.double()
    mu = f.mean(dim=0)
    x = f - mu
    return mu, (x.T @ x) / max(len(f) - 1, 1)


def _tf_version() -> str:
    import torch_fidelity

    return getattr(torch_fidelity, "__version__", "unknown")


def count_images(inp: Any) -> int:
    """Images in a folder as torch-fidelity finds them (png/jpg, recursively) or in a Dataset; one clear error for a
    folder that is missing or holds none."""
    if isinstance(inp, (str, os.PathLike)):
        from torch_fidelity.utils import glob_samples_paths

        if not Path(inp).is_dir():
            raise MetricsError(f"image folder {str(inp)!r} does not exist: pass the path of a folder of images")
        n = len(glob_samples_paths(str(inp), True, "png,jpg,jpeg", verbose=False))
        if n == 0:
            raise MetricsError(f"image folder {str(inp)!r} holds no png/jpg images")
        return n
    return len(inp)


def _check_counts(
    names: list[str], layers: dict[str, str], counts: dict[str, int | None], splits: int, allow_few: bool,
    advice: dict[str, str] | None = None, provided: list[str] | tuple[str, ...] = (),
    layer_flag: str = "--fid-layer", allow_flag: str | None = "--allow-few-samples",
) -> None:
    """Refuse a set (``counts``: its name, its number of images) too small for the metrics. The fix offered:
    ``advice[name]`` (what grows that set, ``{dim}`` the number needed), a numbered layer of ``provided`` that
    every set fits (``layer_flag``), and ``allow_flag`` where the command has one."""
    smallest = min((n for n in counts.values() if n is not None), default=0)
    for label, n in counts.items():
        if n is None:
            continue
        if n < 2:
            raise MetricsError(f"the {label} set has {n} image(s): metrics need at least 2 (a covariance)")
        for m in ("fid", "kid", "prc"):
            dim = _layer_dim(layers.get(m, "")) if m in names else None
            if dim is not None and n < dim and not allow_few:
                fits = [f for f in provided if (_layer_dim(f) or smallest + 1) <= smallest]  # every set fits
                fixes = [advice[label].format(dim=dim)] if advice and label in advice else []
                if fits:
                    fixes.append(f"choose a layer of at most {smallest} dimensions ({layer_flag} {' or '.join(fits)})")
                if allow_flag:
                    fixes.append(f"accept a biased number with {allow_flag}")
                fix = ", ".join(fixes[:-1]) + (" or " if len(fixes) > 1 else "") + fixes[-1] if fixes else (
                    f"use at least {dim} images")
                raise MetricsError(f"{m.upper()} on {dim}-dimensional features needs at least {dim} images per set, "
                                   f"but the {label} set has {n}: {fix}")
        if "isc" in names and label.startswith("generated") and n < splits:
            raise MetricsError(f"IS with {splits} splits needs at least {splits} images, got {n}")
