"""Train the digits feature extractor (the MLP of ``sagan/features.py``) on the real training digits.

    python scripts/train_digits_features.py [--out sagan/assets/digits_mlp.pt]

Deterministic (fixed seed, full-batch Adam, CPU); prints the accuracy on the held-out real digits.
"""

from __future__ import annotations

import argparse
import hashlib

import torch
import torch.nn.functional as F

from sagan.data import digits_to_images, load_digits_arrays
from sagan.features import DIGITS_WEIGHTS, DigitsMLP, uint8_to_digit_inputs
from sagan.metrics import to_uint8


def inputs(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images8, labels = load_digits_arrays(split)
    # through the same 32x32 uint8 path as generated images, so train and use see identical preprocessing
    return uint8_to_digit_inputs(to_uint8(digits_to_images(images8, 32))), labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DIGITS_WEIGHTS))
    p.add_argument("--epochs", type=int, default=600)
    a = p.parse_args()
    torch.manual_seed(0)
    x_tr, y_tr = inputs("train")
    x_te, y_te = inputs("test")
    model = DigitsMLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(a.epochs):
        opt.zero_grad()
        F.cross_entropy(model(x_tr), y_tr).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc_tr = (model(x_tr).argmax(1) == y_tr).float().mean().item()
        acc_te = (model(x_te).argmax(1) == y_te).float().mean().item()
    torch.save(model.state_dict(), a.out)
    sha = hashlib.sha256(open(a.out, "rb").read()).hexdigest()[:16]
    print(f"digits MLP: train accuracy {acc_tr:.1%}, held-out accuracy {acc_te:.1%}; wrote {a.out} (sha256 {sha})")


if __name__ == "__main__":
    main()
