"""From a checkpoint of ``sagan fit`` to a generator, and from seeds to latents.

Checkpoints are read with ``torch.load(..., weights_only=True)``: tensors and plain containers only, never
arbitrary pickled objects.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import CheckpointError
from .layers import refresh_spectral_norm
from .models import Generator

GENERATOR_KEYS = ("resolution", "z_dim", "g_ch", "g_ch_mult", "g_attn", "num_classes", "conditional", "img_channels")


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
    g = Generator(hp["resolution"], hp["z_dim"], hp["g_ch"], hp["g_ch_mult"], hp["g_attn"], n_cls, hp["img_channels"])
    prefix = "g_ema.module." if ema else "generator."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    try:
        g.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint weights do not match the generator its hyper-parameters describe: {str(e).splitlines()[0]}"
        ) from None
    g.eval()
    if ema:
        refresh_spectral_norm(g, n_iterations=5)
    return g.to(device)


def sample_labels(n: int, num_classes: int, generator: torch.Generator | None = None) -> Tensor:
    return torch.randint(0, num_classes, (n,), generator=generator)


def latents_for_seeds(seeds: list[int], z_dim: int) -> Tensor:
    """One latent per seed, each drawn from its own ``torch.Generator``: sample i depends only on seed i."""
    return torch.stack([torch.randn(z_dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
