"""Generated class labels in evaluation: uniform random draws (the protocol before 2026-11-24, and StudioGAN's /
BigGAN-PyTorch's) against the reference set's class frequencies, rounded and shuffled (``metrics.generated_labels``,
the protocol now), on one checkpoint of a class-conditional model, over several evaluation seeds.

    python scripts/label_protocol.py outputs/digits/checkpoints/last.ckpt [--seeds 10] [--num-samples 1000]

Prints, per protocol, FID and recall of evaluation seed 0 and their mean and standard deviation over the seeds
(same generator, same latents: only the labels differ). Data and features as ``sagan evaluate`` picks them
(digits-mlp for the digits, else InceptionV3).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from sagan import metrics as M
from sagan.evaluate import _datamodule
from sagan.features import DIGITS_FEATURE_EXTRACTOR
from sagan.sampling import generator_from_checkpoint, load_checkpoint


def uniform_labels(n: int, k: int, counts: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """The protocol before: one uniform random class per sample."""
    return torch.randint(0, k, (n,), generator=gen) if k else torch.zeros(n, dtype=torch.long)


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--weights", help="InceptionV3 weights (offline)")
    a = p.parse_args(argv)
    ckpt = load_checkpoint(a.ckpt)
    dm = _datamodule(ckpt, None, None)
    spec = M.resolve_feature_extractor(DIGITS_FEATURE_EXTRACTOR if dm.dataset == "digits" else M.INCEPTION, a.weights)
    ev = M.Evaluator(spec, "fid,prc", device="cpu")
    ev.load_reference(dm.build_dataset("train"), num_classes=dm.num_classes)
    g = generator_from_checkpoint(ckpt)
    lines = [f"reference class counts: {ev.reference.class_counts.tolist() if ev.reference.class_counts is not None else None}",
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


if __name__ == "__main__":
    main()
