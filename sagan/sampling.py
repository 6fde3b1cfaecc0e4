"""From a checkpoint of ``sagan fit`` to a generator, and from seeds to latents.

Checkpoints are read with ``torch.load(..., weights_only=True)``: tensors and plain containers only, never
arbitrary pickled objects.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import CheckpointError, SaganError
from .models import Generator, conditioning_strength

GENERATOR_KEYS = ("resolution", "z_dim", "g_ch", "g_ch_mult", "g_attn", "num_classes", "conditional", "img_channels")


def resolve_device(name: str) -> torch.device:
    """``--device`` of ``sagan evaluate`` / ``generate`` (cpu, cuda, cuda:1, mps ...), checked against this machine
    with one clear error instead of a CUDA initialisation traceback."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise SaganError(f"--device {name!r} is not a device ({e}): use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise SaganError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= n:
            raise SaganError(f"--device {name}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    return device


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a Lightning checkpoint safely (``weights_only=True``) with one clear error for every failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist: pass the path of a .ckpt written by 'sagan fit'")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or truncated, or not a PyTorch checkpoint at all; "
            "use another checkpoint, e.g. an earlier last.ckpt"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds objects other than tensors and plain containers, and is not loaded "
            f"(weights_only=True refuses arbitrary code): {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or truncated ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "use another checkpoint, e.g. an earlier last.ckpt"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"{str(path)!r} is not a checkpoint written by 'sagan fit' (no state_dict/hyper_parameters)")
    return ckpt


def generator_from_checkpoint(
    ckpt: dict[str, Any] | str | os.PathLike, ema: bool = True, device: str | torch.device = "cpu"
) -> Generator:
    """Rebuild the generator of a ``sagan fit`` checkpoint, EMA weights by default, in eval mode."""
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    hp = ckpt["hyper_parameters"]
    missing = [k for k in GENERATOR_KEYS if k not in hp]
    if missing:
        raise CheckpointError(f"checkpoint hyper-parameters lack {missing}: it was not written by 'sagan fit'")
    n_cls = hp["num_classes"] if hp["conditional"] else 0
    # checkpoints written before ``cbn_sn`` existed used spectrally normalised CBN embeddings
    g = Generator(hp["resolution"], hp["z_dim"], hp["g_ch"], hp["g_ch_mult"], hp["g_attn"], n_cls, hp["img_channels"],
                  hp.get("cbn_sn", True), hp.get("skip_z", False))
    prefix = "g_ema.module." if ema else "generator."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    try:
        g.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint weights do not match the generator its hyper-parameters describe: {str(e).splitlines()[0]}"
        ) from None
    if hp.get("cond_ramp") is not None and n_cls:  # mid-transition checkpoints are evaluated as trained
        g.cond_strength = conditioning_strength(hp["cond_ramp"], ckpt.get("sagan", {}).get("g_steps", 0))
    g.eval()  # as saved: the EMA's spectral-norm vectors are kept current in training (SAGAN._update_ema)
    return g.to(device)


def class_names(ckpt: dict[str, Any], num_classes: int) -> list[str]:
    """The names of a checkpoint's classes, in label order: the image folder's class subfolders (sorted), CIFAR-10's
    names, the digits' "0".."9"; the labels themselves ("0".."K-1") for checkpoints written before names were kept."""
    names = ckpt.get("class_names")
    if isinstance(names, list) and len(names) == num_classes:
        return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]


def parse_class(spec: str | int, names: list[str]) -> int:
    """A class given by name (one of ``names``) or by label index; a name wins where both could be meant (a folder
    of classes named "1", "10", "2" is sorted as strings, so name "2" is label 2 only by chance)."""
    spec = str(spec)
    if spec in names:
        return names.index(spec)
    if re.fullmatch(r"-?\d+", spec.strip()) and 0 <= int(spec) < len(names):
        return int(spec)
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    raise ValueError(f"class {spec!r} is not one of the model's classes: give a name ({shown}) or a label 0..{len(names) - 1}")


_LABEL_STREAM = 0x5EED_0000_0000  # offset of the per-seed label generator, apart from the latent one


def parse_seeds(spec: str) -> list[int]:
    """'0-99' -> [0..99]; '1,5,9' -> [1, 5, 9]; '0-3,10' -> [0, 1, 2, 3, 10]."""
    seeds: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"bad seed list {spec!r}: use e.g. '0-99', '1,5,9' or '0-3,10' (non-negative integers)")
        lo = int(m.group(1))
        seeds += range(lo, int(m.group(2) or lo) + 1)
    return seeds


def latent_for_seed(seed: int, z_dim: int, truncation: float | None = None) -> Tensor:
    """z ~ N(0, I) of size z_dim from its own generator seeded with ``seed``; with ``truncation`` T, entries with
    |z| > T are redrawn (from the same generator) until all lie within [-T, T] (the truncation trick)."""
    g = torch.Generator().manual_seed(int(seed))
    z = torch.randn(z_dim, generator=g)
    if truncation is not None:
        if truncation <= 0:
            raise ValueError(f"truncation must be positive, got {truncation}")
        bad = z.abs() > truncation
        while bad.any():
            z[bad] = torch.randn(int(bad.sum()), generator=g)
            bad = z.abs() > truncation
    return z


def latents_for_seeds(seeds: list[int], z_dim: int, truncation: float | None = None) -> Tensor:
    """(len(seeds), z_dim): sample i depends only on seed i, never on the batch it is generated in."""
    return torch.stack([latent_for_seed(s, z_dim, truncation) for s in seeds])


def labels_for_seeds(seeds: list[int], num_classes: int) -> Tensor:
    """One uniform class label per seed, from a per-seed generator of its own."""
    return torch.tensor(
        [int(torch.randint(0, num_classes, (1,), generator=torch.Generator().manual_seed(int(s) + _LABEL_STREAM)))
         for s in seeds],
        dtype=torch.long,
    )


def slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Spherical interpolation between latents a and b (exactly a at t=0 and b at t=1)."""
    if t == 0.0:
        return a.clone()
    if t == 1.0:
        return b.clone()
    cos = torch.dot(a / a.norm(), b / b.norm()).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    if omega.abs() < 1e-6:
        return torch.lerp(a, b, t)
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
