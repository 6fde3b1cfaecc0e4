"""Class-imbalanced training data: a long-tailed cut of the digits as an image folder, and scores of runs on it.

    python scripts/imbalanced_digits.py make /tmp/digits_lt [--imbalance 10] [--seed 0]
    sagan fit --config configs/digits.yaml --data.dataset folder --data.root /tmp/digits_lt --data.channels 1 \\
        --fid.every_n_steps 0 --model.fake_labels {uniform,data} --seed_everything S --experiment E
    python scripts/imbalanced_digits.py score /tmp/digits_lt outputs/E1/checkpoints/last.ckpt ...

``make`` writes the 1,437 training digits (32x32 PNGs, one subfolder per class) with class c cut to
``n_c * imbalance ** (-c / 9)`` images (CIFAR-10-LT's exponential profile: class 0 whole, class 9 ``1/imbalance``
of it), a random subset drawn with ``seed``. ``score`` scores each checkpoint against that folder as the reference
(digits-mlp features; generated classes at the folder's frequencies, as ``sagan evaluate`` asks for them): FID,
precision, recall, the spread; and the digits classifier's accuracy on 1,000 class-balanced samples, overall and
on the three rarest classes (7-9). BENCHMARKS.md "Imbalanced classes" is its output.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from PIL import Image

from sagan import metrics as M
from sagan.data import SAGANData
from sagan.digits import evaluate_digit_samples
from sagan.features import DIGITS_FEATURE_EXTRACTOR
from sagan.sampling import generator_from_checkpoint


def make(out: Path, imbalance: float, seed: int) -> list[int]:
    """Write the long-tailed digits folder; the images of each class."""
    x, y = SAGANData("digits", resolution=32, channels=1).build_dataset("train").tensors  # (N, 1, 32, 32) uint8
    gen = torch.Generator().manual_seed(seed)
    counts = []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        n = int(round(len(idx) * imbalance ** (-c / 9)))
        (out / str(c)).mkdir(parents=True, exist_ok=True)
        for i in idx[torch.randperm(len(idx), generator=gen)[:n]].tolist():
            Image.fromarray(x[i, 0].numpy()).save(out / str(c) / f"{i:04d}.png")
        counts.append(n)
    return counts


def score(root: Path, ckpts: list[str], num_samples: int) -> list[str]:
    """One row per checkpoint against the folder ``root``; a mean row when there are several."""
    ev = M.Evaluator(M.resolve_feature_extractor(DIGITS_FEATURE_EXTRACTOR, None), "fid,prc", device="cpu")
    ev.load_reference(SAGANData("folder", root=str(root), resolution=32, channels=1).build_dataset("train"),
                      num_classes=10)
    keys = ("fid", "precision", "recall", "spread", "accuracy", "accuracy 7-9")
    lines = [f"reference: {root} ({ev.reference.class_counts.tolist()} images by class)",
             "| checkpoint | " + " | ".join(keys) + " |", "| --- |" + " ---: |" * len(keys)]
    print("\n".join(lines), flush=True)
    rows = []
    for path in ckpts:
        g = generator_from_checkpoint(path)
        v = ev.generator(g, num_samples, seed=0).values
        acc = evaluate_digit_samples(g, num_samples, seed=0)
        rows.append((v["fid"], v["precision"], v["recall"], v["spread"], acc.sample_accuracy,
                     statistics.fmean(acc.per_class_accuracy[7:])))
        lines.append(f"| {path} | " + " | ".join(f"{x:.4f}" for x in rows[-1]) + " |")
        print(lines[-1], flush=True)
    if len(rows) > 1:
        lines.append("| mean | " + " | ".join(f"{statistics.fmean(col):.4f}" for col in zip(*rows)) + " |")
        print(lines[-1])
    return lines


def main(argv: list[str] | None = None) -> list[str] | list[int]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="write the long-tailed digits folder")
    m.add_argument("out", type=Path)
    m.add_argument("--imbalance", type=float, default=10.0, help="images of class 0 over images of class 9")
    m.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("score", help="score checkpoints against the folder")
    s.add_argument("root", type=Path)
    s.add_argument("ckpts", nargs="+")
    s.add_argument("--num-samples", type=int, default=1000)
    a = p.parse_args(argv)
    if a.command == "make":
        if a.imbalance < 1:
            p.error("--imbalance must be >= 1 (images of class 0 over images of class 9)")
        counts = make(a.out, a.imbalance, a.seed)
        print(f"wrote {sum(counts)} images to {a.out}: {counts} by class")
        return counts
    return score(a.root, a.ckpts, a.num_samples)


if __name__ == "__main__":
    main()
