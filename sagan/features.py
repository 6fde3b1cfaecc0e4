"""A domain feature extractor for the built-in digits set, registered with torch-fidelity as ``digits-mlp``.

Inception features say little about 8x8 handwritten digits and need a download; for the offline demo FID is
computed on the penultimate layer (64 features) of a small MLP classifier trained on the real training digits
(``scripts/train_digits_features.py`` writes its weights, shipped in ``sagan/assets/digits_mlp.pt``). Its logits
give a digits Inception Score. Numbers are comparable only between runs that use the same weights file (its hash
is part of every reported protocol).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

DIGITS_FEATURE_EXTRACTOR = "digits-mlp"
DIGITS_WEIGHTS = Path(__file__).resolve().parent / "assets" / "digits_mlp.pt"


class DigitsMLP(nn.Module):
    """64 -> 256 -> 64 -> 10 MLP on 8x8 digit intensities scaled to [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 64)
        self.head = nn.Linear(64, 10)

    def features(self, x: Tensor) -> Tensor:
        return F.relu(self.fc2(F.relu(self.fc1(x))))  # (B, 64) penultimate features

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # (B, 10) logits


def uint8_to_digit_inputs(x: Tensor) -> Tensor:
    """(B, 3, H, W) uint8 images -> (B, 64) 8x8 intensities in [0, 1], the classifier's input."""
    g = x.float().mean(dim=1, keepdim=True) / 255.0  # (B, 1, H, W)
    return F.adaptive_avg_pool2d(g, 8).flatten(1)  # (B, 64)


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor: features '64' (penultimate layer) and 'logits_unbiased' (10 classes)."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None, **kwargs) -> None:
        super().__init__(name, features_list)
        self.mlp = DigitsMLP()
        path = feature_extractor_weights_path or DIGITS_WEIGHTS
        self.mlp.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("64", "logits_unbiased")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits_unbiased", "fid": "64", "kid": "64", "prc": "64"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        feats = self.mlp.features(uint8_to_digit_inputs(x).to(self.mlp.fc1.weight.device))
        out = {"64": feats, "logits_unbiased": self.mlp.head(feats)}
        return tuple(out[name] for name in self.features_list)


def register() -> None:
    """Register ``digits-mlp`` with torch-fidelity (idempotent)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if DIGITS_FEATURE_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(DIGITS_FEATURE_EXTRACTOR, DigitsFeatureExtractor)
