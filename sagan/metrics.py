"""The torch-fidelity bridge: FID (Heusel et al. 2017), IS (Salimans et al. 2016), KID (Binkowski et al. 2018).

* :func:`to_uint8` is the one place where generator output becomes what metrics see: uint8 (B, 3, H, W),
  grayscale repeated to three channels.
* :class:`FidelityGenerator` hands a generator to ``torch_fidelity.calculate_metrics`` as an in-memory input: the
  latents come from torch-fidelity's seeded noise, the class labels of conditional models from our own seeded
  ``torch.Generator`` (torch-fidelity's conditional path uses ``np.int`` and fails under NumPy 2), so no image file
  is ever written.
* Reference statistics are cached by torch-fidelity under a name that holds the data set, split, resolution,
  channels, a fingerprint of the data, the feature extractor and the hash of its weights: changing any of them
  makes a new entry, so a stale one is never reused.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from torch_fidelity import GenerativeModelBase, calculate_metrics

from . import features
from .errors import SaganError

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


class MetricsError(SaganError):
    """Metrics cannot be computed as asked (weights missing, too few images, ...)."""


def to_uint8(images: Tensor) -> Tensor:
    """Generator output in [-1, 1], (B, C, H, W) with C in {1, 3} -> uint8 (B, 3, H, W), values round(x01 * 255)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
    x = ((images.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x  # (B, 3, H, W)


class FidelityGenerator(GenerativeModelBase):
    """A generator as torch-fidelity input: ``forward(z) -> uint8 (B, 3, H, W)``.

    Unconditional from torch-fidelity's point of view (``num_classes == 0``); a conditional generator gets uniform
    class labels from a ``torch.Generator`` seeded with ``seed``, so a run is reproducible given (seed, batch size).
    """

    def __init__(self, generator: nn.Module, seed: int = 0) -> None:
        super().__init__()
        self.generator = generator
        self.label_rng = torch.Generator().manual_seed(seed)

    @property
    def z_size(self) -> int:
        return int(self.generator.z_dim)

    @property
    def z_type(self) -> str:
        return "normal"

    @property
    def num_classes(self) -> int:
        return 0  # labels are drawn here, not by torch-fidelity

    @torch.no_grad()
    def forward(self, z: Tensor) -> Tensor:
        device = next(self.generator.parameters()).device
        k = int(getattr(self.generator, "num_classes", 0))
        y = torch.randint(0, k, (z.shape[0],), generator=self.label_rng).to(device) if k > 0 else None
        return to_uint8(self.generator(z.to(device), y))


class UInt8Images(Dataset):
    """A data set of (image in [-1, 1], label) pairs seen as uint8 (3, H, W) images, as torch-fidelity wants."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Tensor:
        item = self.dataset[i]
        img = item[0] if isinstance(item, (tuple, list)) else item
        return to_uint8(img.unsqueeze(0))[0]


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
    input1: nn.Module | Dataset | str,
    input2: Dataset | str | None,
    *,
    metrics: str | Sequence[str] = ("fid",),
    num_samples: int | None = None,
    feature_extractor: FeatureSpec | str = INCEPTION,
    fid_layer: str | None = None,
    input2_cache_name: str | None = None,
    cache_root: str | None = None,
    seed: int = 0,
    batch_size: int = 100,
    device: str | torch.device | None = None,
    kid_subset_size: int = 1000,
    isc_splits: int = 10,
    allow_few_samples: bool = False,
    verbose: bool = False,
) -> MetricsResult:
    """FID / IS / KID / precision-recall of ``input1`` (a generator, a Dataset of images or a folder) against
    ``input2`` (a Dataset or folder; cached under ``input2_cache_name`` when given).

    A generator (an ``nn.Module`` with ``z_dim``) is sampled in memory: ``num_samples`` images, latents seeded
    with ``seed``. Raises :class:`MetricsError` with the fix when the inputs cannot give a meaningful number: in
    particular FID/KID/PR on fewer images than the feature dimension (a rank-deficient covariance, a strongly
    biased number) unless ``allow_few_samples`` (then recorded in the protocol).
    """
    names = parse_metrics(metrics)
    spec = feature_extractor if isinstance(feature_extractor, FeatureSpec) else resolve_feature_extractor(feature_extractor)
    binary = [m for m in names if m != "isc"]
    if binary and input2 is None:
        raise MetricsError(f"{', '.join(binary)} compare two sets: a reference set is needed")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")

    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    cls = FEATURE_EXTRACTORS_REGISTRY[spec.name]
    layers = {m: (fid_layer if (fid_layer and m in ("fid", "kid", "prc")) else cls.get_default_feature_layer_for_metric(m)) for m in names}

    is_generator = isinstance(input1, nn.Module) and not isinstance(input1, GenerativeModelBase)
    if is_generator:
        if num_samples is None or num_samples < 1:
            raise MetricsError(f"the number of generated samples must be a positive integer, got {num_samples}")
        input1 = FidelityGenerator(input1, seed=seed).to(device)
        n1 = num_samples
    else:
        n1 = _count(input1)
    n2 = None
    if input2 is not None:
        n2 = _count(input2) if not (input2_cache_name and _cached(input2_cache_name, spec, layers, cache_root)) else None
    _check_counts(names, layers, n1, n2, isc_splits, allow_few_samples)
    kid_size = min(kid_subset_size, n1, n2 or n1)

    kwargs: dict[str, Any] = dict(
        input1=input1,
        input2=input2,
        cuda=device.type == "cuda",
        batch_size=batch_size,
        isc="isc" in names,
        fid="fid" in names,
        kid="kid" in names,
        prc="prc" in names,
        feature_extractor=spec.name,
        feature_extractor_weights_path=spec.weights_path,
        feature_layer_fid=layers.get("fid"),
        feature_layer_kid=layers.get("kid"),
        feature_layer_prc=layers.get("prc"),
        input2_cache_name=input2_cache_name,
        cache_root=cache_root,
        cache=input2_cache_name is not None,
        rng_seed=seed,
        kid_subset_size=kid_size,
        isc_splits=isc_splits,
        save_cpu_ram=True,
        samples_find_deep=True,
        verbose=verbose,
    )
    if is_generator:
        kwargs["input1_model_num_samples"] = num_samples
    try:
        raw = calculate_metrics(**kwargs)
    except ValueError as e:  # torch-fidelity's assertions
        raise MetricsError(f"torch-fidelity refused the inputs: {e}") from None
    values = {_RESULT_KEYS.get(k, k): float(v) for k, v in raw.items()}
    protocol = {
        "metrics": names,
        "num_input1": n1,
        "num_input2": n2 if n2 is not None else "cached",
        "feature_extractor": spec.name,
        "feature_layers": layers,
        "feature_extractor_weights_sha256": spec.weights_sha256,
        "reference_cache_name": input2_cache_name,
        "seed": seed,
        "kid_subset_size": kid_size if "kid" in names else None,
        "isc_splits": isc_splits if "isc" in names else None,
        "allow_few_samples": allow_few_samples,
        "torch_fidelity": _tf_version(),
    }
    return MetricsResult(values, protocol)


def _tf_version() -> str:
    import torch_fidelity

    return getattr(torch_fidelity, "__version__", "unknown")


def _count(inp: Any) -> int:
    if isinstance(inp, (str, os.PathLike)):
        from torch_fidelity.utils import glob_samples_paths

        if not Path(inp).is_dir():
            raise MetricsError(f"image folder {str(inp)!r} does not exist")
        n = len(glob_samples_paths(str(inp), True, "png,jpg,jpeg", verbose=False))
        if n == 0:
            raise MetricsError(f"image folder {str(inp)!r} holds no png/jpg images")
        return n
    return len(inp)


def _cached(name: str, spec: FeatureSpec, layers: dict[str, str], cache_root: str | None) -> bool:
    """Whether torch-fidelity holds everything it needs for input2 under ``name`` (then the data is not read)."""
    root = Path(cache_root) if cache_root else Path(torch.hub._get_torch_home()) / "fidelity_cache"
    need = []
    if set(layers) == {"fid"}:
        need.append(root / f"{name}-{spec.name}-stat-fid-{layers['fid']}.pt")
    else:
        need += [root / f"{name}-{spec.name}-features-{layer}.pt" for layer in set(layers.values())]
    return all(p.exists() for p in need)


def _check_counts(
    names: list[str], layers: dict[str, str], n1: int, n2: int | None, splits: int, allow_few: bool
) -> None:
    for label, n in (("generated/first", n1), ("reference/second", n2)):
        if n is None:
            continue
        if n < 2:
            raise MetricsError(f"the {label} set has {n} image(s): metrics need at least 2 (a covariance)")
        for m in ("fid", "kid", "prc"):
            dim = _layer_dim(layers.get(m, "")) if m in names else None
            if dim is not None and n < dim and not allow_few:
                raise MetricsError(
                    f"{m.upper()} on {dim}-dimensional features needs at least {dim} images per set, but the {label} "
                    f"set has {n}: use more images (e.g. --num-samples {max(dim, 1000)}), a smaller feature layer, "
                    "or accept a biased number with --allow-few-samples"
                )
        if "isc" in names and label.startswith("generated") and n < splits:
            raise MetricsError(f"IS with {splits} splits needs at least {splits} images, got {n}")
