"""Class-imbalanced training data: a long-tailed cut of the digits as an image folder, and scores of runs on it.

    python scripts/imbalanced_digits.py make /tmp/digits_lt [--imbalance 10] [--profile exp|step] [--seed 0]
    sagan fit --config configs/digits.yaml --data.dataset folder --data.root /tmp/digits_lt --data.channels 1 \\
        --fid.every_n_steps 0 --model.fake_labels {uniform,data} --seed_everything S --experiment E
    python scripts/imbalanced_digits.py score /tmp/digits_lt outputs/E1/checkpoints/last.ckpt ...

``make`` writes the 1,437 training digits (32x32 PNGs, one subfolder per class) with class c cut to
``n_c * imbalance ** (-c / 9)`` images (``exp``, CIFAR-10-LT's exponential profile: class 0 whole, class 9
``1/imbalance`` of it), or classes 5-9 cut to ``n_c / imbalance`` (``step``, the step profile of the
class-imbalance literature), a random subset drawn with ``seed``. ``score`` scores each checkpoint against that folder as the reference
(digits-mlp features; generated classes at the folder's frequencies, as ``sagan evaluate`` asks for them): FID,
precision, recall, the spread; and the digits classifier's accuracy on 1,000 class-balanced samples, overall and
on the ``--rare`` classes with the fewest images (3: classes 7-9 of the ``exp`` profile; 5 for ``step``). BENCHMARKS.md "Imbalanced classes" is its output.
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


def make(out: Path, imbalance: float, seed: int, profile: str = "exp") -> list[int]:
    """Write the long-tailed digits folder; the images of each class."""
    x, y = SAGANData("digits", resolution=32, channels=1).build_dataset("train").tensors  # (N, 1, 32, 32) uint8
    gen = torch.Generator().manual_seed(seed)
    counts = []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        share = imbalance ** (-c / 9) if profile == "exp" else (1.0 if c < 5 else 1.0 / imbalance)
        n = int(round(len(idx) * share))
        (out / str(c)).mkdir(parents=True, exist_ok=True)
        for i in idx[torch.randperm(len(idx), generator=gen)[:n]].tolist():
            Image.fromarray(x[i, 0].numpy()).save(out / str(c) / f"{i:04d}.png")
        counts.append(n)
    return counts


def score(root: Path, ckpts: list[str], num_samples: int, rare: int = 3) -> list[str]:
    """One row per checkpoint against the folder ``root``; a mean row when there are several."""
    ev = M.Evaluator(M.resolve_feature_extractor(DIGITS_FEATURE_EXTRACTOR, None), "fid,prc", device="cpu")
    ev.load_reference(SAGANData("folder", root=str(root), resolution=32, channels=1).build_dataset("train"),
                      num_classes=10)
    counts = ev.reference.class_counts.tolist()
    rarest = sorted(sorted(range(10), key=lambda c: (counts[c], c))[:rare])
    keys = ("fid", "precision", "recall", "spread", "accuracy", f"accuracy {','.join(map(str, rarest))}")
    lines = [f"reference: {root} ({counts} images by class)",
             "| checkpoint | " + " | ".join(keys) + " |", "| --- |" + " ---: |" * len(keys)]
    print("\n".join(lines), flush=True)
    rows = []
    for path in ckpts:
        g = generator_from_checkpoint(path)
        v = ev.generator(g, num_samples, seed=0).values
        acc = evaluate_digit_samples(g, num_samples, seed=0)
        rows.append((v["fid"], v["precision"], v["recall"], v["spread"], acc.sample_accuracy,
                     statistics.fmean(acc.per_class_accuracy[c] for c in rarest)))
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
    m.add_argument("--profile", choices=("exp", "step"), default="exp",
                   help="exp: class c keeps imbalance**(-c/9); step: classes 5-9 keep 1/imbalance")
    m.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("score", help="score checkpoints against the folder")
    s.add_argument("root", type=Path)
    s.add_argument("ckpts", nargs="+")
    s.add_argument("--num-samples", type=int, default=1000)
    s.add_argument("--rare", type=int, default=3, help="how many of the rarest classes the last column averages")
    a = p.parse_args(argv)
    if a.command == "make":
        if a.imbalance < 1:
            p.error("--imbalance must be >= 1 (images of class 0 over images of class 9)")
        counts = make(a.out, a.imbalance, a.seed, a.profile)
        print(f"wrote {sum(counts)} images to {a.out}: {counts} by class")
        return counts
    if not 1 <= a.rare <= 10:
        p.error("--rare must be between 1 and 10")
    return score(a.root, a.ckpts, a.num_samples, a.rare)


if __name__ == "__main__":
    main()
