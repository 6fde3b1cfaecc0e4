"""How many class-conditional samples of a digits checkpoint does a classifier trained on real digits recognise?

    python scripts/digits_accuracy.py outputs/digits/checkpoints/last.ckpt [--num-samples 1000] [--no-ema]
"""

from __future__ import annotations

import argparse
import sys

from sagan.digits import evaluate_digit_samples
from sagan.errors import SaganError
from sagan.sampling import generator_from_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="judge the raw generator instead of the EMA one")
    a = p.parse_args()
    try:
        g = generator_from_checkpoint(a.ckpt, ema=not a.no_ema)
    except SaganError as e:
        sys.exit(f"digits_accuracy: error: {e}")
    if g.num_classes != 10:
        sys.exit("digits_accuracy: error: this checkpoint is not a class-conditional digits model (10 classes)")
    r = evaluate_digit_samples(g, a.num_samples, seed=a.seed)
    print(f"digit classifier (SVC on real 8x8 digits): {r.real_heldout_accuracy:.1%} on held-out real digits")
    print(
        f"{'EMA' if not a.no_ema else 'raw'} generator samples recognised as the requested digit: "
        f"{r.sample_accuracy:.1%} of {r.num_samples}"
    )
    print("per class: " + "  ".join(f"{c}:{acc:.0%}" for c, acc in enumerate(r.per_class_accuracy)))


if __name__ == "__main__":
    main()
