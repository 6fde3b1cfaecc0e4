"""Generated class labels in evaluation: uniform random draws (the protocol before 2026-11-24, and StudioGAN's /
BigGAN-PyTorch's) against the reference set's class frequencies, rounded and shuffled (``metrics.generated_labels``,
the protocol now), on one checkpoint of a class-conditional model, over several evaluation seeds.

    python scripts/label_protocol.py outputs/digits/checkpoints/last.ckpt [--seeds 10] [--num-samples 1000]
    python scripts/label_protocol.py run1/last.ckpt run2/last.ckpt ... --per-checkpoint

Prints, per protocol, FID and recall of evaluation seed 0 and their mean and standard deviation over the seeds
(same generator, same latents: only the labels differ). Data and features as ``sagan evaluate`` picks them
(digits-mlp for the digits, else InceptionV3).

``--per-checkpoint`` (several training seeds or stops, one data set): one row per checkpoint at evaluation seed 0,
FID as a multiple of the floor and recall as a fraction of the floor's (the held-out split against the reference,
as ``sagan evaluate --floor``) under both protocols, and for digits models the classifier's accuracy
(``scripts/digits_accuracy.py``).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from sagan import metrics as M
from sagan.evaluate import _datamodule
from sagan.digits import evaluate_digit_samples
from sagan.features import DIGITS_FEATURE_EXTRACTOR
from sagan.sampling import generator_from_checkpoint, load_checkpoint


def uniform_labels(n: int, k: int, counts: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """The protocol before: one uniform random class per sample."""
    return torch.randint(0, k, (n,), generator=gen) if k else torch.zeros(n, dtype=torch.long)


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", nargs="+")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--weights", help="InceptionV3 weights (offline)")
    p.add_argument("--per-checkpoint", action="store_true",
                   help="one row per checkpoint (evaluation seed 0), FID and recall against the floor")
    a = p.parse_args(argv)
    if len(a.ckpt) > 1 and not a.per_checkpoint:
        p.error("several checkpoints need --per-checkpoint")
    ckpt = load_checkpoint(a.ckpt[0])
    dm = _datamodule(ckpt, None, None)
    spec = M.resolve_feature_extractor(DIGITS_FEATURE_EXTRACTOR if dm.dataset == "digits" else M.INCEPTION, a.weights)
    ev = M.Evaluator(spec, "fid,prc", device="cpu")
    ev.load_reference(dm.build_dataset("train"), num_classes=dm.num_classes)
    if a.per_checkpoint:
        return _per_checkpoint(a, ev, dm)
    g = generator_from_checkpoint(ckpt)
    counts = ev.reference.class_counts
    lines = [f"reference class counts: {counts.tolist() if counts is not None else None}",
             f"| labels | FID, seed 0 | FID, seeds 0-{a.seeds - 1}: mean (sd) | recall, seed 0 | recall: mean (sd) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    current = M.generated_labels
    try:
        for name, fn in (("uniform random (before)", uniform_labels), ("class frequencies (now)", current)):
            M.generated_labels = fn
            vals = [ev.generator(g, a.num_samples, seed=s).values for s in range(a.seeds)]
            fid, rec = [v["fid"] for v in vals], [v["recall"] for v in vals]
            sd = (lambda x: statistics.stdev(x) if len(x) > 1 else 0.0)
            lines.append(f"| {name} | {fid[0]:.4f} | {statistics.fmean(fid):.4f} ({sd(fid):.4f}) | {rec[0]:.4f} | "
                         f"{statistics.fmean(rec):.4f} ({sd(rec):.4f}) |")
    finally:
        M.generated_labels = current
    print("\n".join(lines))
    return lines


def _per_checkpoint(a: argparse.Namespace, ev: M.Evaluator, dm) -> list[str]:
    """One row per checkpoint of ``a.ckpt``: both protocols at evaluation seed 0, against the held-out floor."""
    held_out = [s for s in dm.splits if s != "train"]
    if not held_out:
        raise SystemExit(f"label_protocol: error: --per-checkpoint needs a held-out split for the floor, and data set "
                         f"{dm.dataset!r} has only {list(dm.splits)}")
    floor = ev.images(dm.build_dataset(held_out[0]), num_classes=dm.num_classes, seed=0).values
    digits = dm.dataset == "digits"
    lines = [f"floor ({held_out[0]} split against train): FID {floor['fid']:.4f}, recall {floor['recall']:.4f}",
             "| checkpoint | FID / floor, uniform labels | FID / floor, class frequencies | recall / floor's, uniform "
             "| recall / floor's, class frequencies |" + (" accuracy |" if digits else ""),
             "| --- | ---: | ---: | ---: | ---: |" + (" ---: |" if digits else "")]
    print("\n".join(lines), flush=True)
    current = M.generated_labels
    try:
        for path in a.ckpt:
            g = generator_from_checkpoint(path)
            cells = {}
            for name, fn in (("uniform", uniform_labels), ("frequencies", current)):
                M.generated_labels = fn
                cells[name] = ev.generator(g, a.num_samples, seed=0).values
            u, f = cells["uniform"], cells["frequencies"]
            row = (f"| {path} | {u['fid'] / floor['fid']:.2f}x | {f['fid'] / floor['fid']:.2f}x | "
                   f"{u['recall'] / floor['recall']:.3f} | {f['recall'] / floor['recall']:.3f} |")
            if digits:
                row += f" {evaluate_digit_samples(g, a.num_samples, seed=0).sample_accuracy:.1%} |"
            lines.append(row)
            print(row, flush=True)
    finally:
        M.generated_labels = current
    return lines


if __name__ == "__main__":
    main()
