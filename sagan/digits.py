"""Checks on the built-in digits set: a classifier trained on real digits judges class-conditional samples.

The classifier is an RBF support-vector machine on the 8x8 intensities of scikit-learn's digits (the classic
recipe, ~99% on held-out real digits); generated 32x32 images are average-pooled back to 8x8 before it sees them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .data import images_to_digits, load_digits_arrays


def train_digit_classifier():
    """An SVC fitted on the real training digits, and its accuracy on the held-out real digits."""
    from sklearn.svm import SVC

    x_tr, y_tr = load_digits_arrays("train")
    x_te, y_te = load_digits_arrays("test")
    clf = SVC(gamma=0.001, C=10.0).fit(x_tr.flatten(1).numpy(), y_tr.numpy())
    acc = float((clf.predict(x_te.flatten(1).numpy()) == y_te.numpy()).mean())
    return clf, acc


@dataclass
class DigitsReport:
    real_heldout_accuracy: float
    sample_accuracy: float
    per_class_accuracy: list[float]
    num_samples: int


@torch.no_grad()
def evaluate_digit_samples(generator: nn.Module, num_samples: int = 1000, seed: int = 0, batch_size: int = 250) -> DigitsReport:
    """Fraction of ``num_samples`` class-conditional samples (classes balanced) recognised as the requested digit."""
    clf, real_acc = train_digit_classifier()
    device = next(generator.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_samples) % 10
    preds = []
    for y in labels.split(batch_size):
        z = torch.randn(len(y), generator.z_dim, generator=gen)
        imgs = generator(z.to(device), y.to(device)).cpu()
        preds.append(clf.predict(images_to_digits(imgs).numpy()))
    pred = np.concatenate(preds)
    correct = pred == labels.numpy()
    per_class = [float(correct[labels.numpy() == c].mean()) for c in range(10)]
    return DigitsReport(real_acc, float(correct.mean()), per_class, num_samples)
