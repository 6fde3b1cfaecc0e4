"""A second real data set that works offline: 32x32 patches of the real photographs shipped inside scikit-image.

    pip install scikit-image   # not a dependency of sagan; only this script needs it
    python scripts/make_photo_patches.py --out data/photos32 --per-class 1000 --test-per-class 200
    python scripts/make_photo_patches.py --out data/photos64 --size 64 --per-class 2000 --test-per-class 0

Ten classes, one per photograph (astronaut, coffee, chelsea the cat, rocket, motorcycle, Hubble deep field,
immunohistochemistry slide, brick wall, grass, gravel): random square crops of 40 to 160 pixels, resized to ``--size``
(32 by default; bicubic) and saved as PNG, one subfolder per class. Training crops come from the left 75% of each photograph and
held-out crops from the right 25%, so the held-out folder (the FID floor) shares no pixels with the training one.
A class-conditional GAN that collapses draws the same patch for every latent of a class; the real patches of a
class vary in position, scale and content.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle", "hubble_deep_field",
          "immunohistochemistry", "brick", "grass", "gravel")


def _photo(name: str) -> Image.Image:
    try:
        from skimage import data
    except ImportError:
        sys.exit("make_photo_patches.py: error: this script reads the photographs shipped in scikit-image, which "
                 "is not installed (it is no dependency of sagan): .venv/bin/pip install scikit-image")

    arr = getattr(data, name)()
    arr = arr[0] if isinstance(arr, tuple) else arr  # stereo_motorcycle: (left, right, disparity)
    return Image.fromarray(arr).convert("RGB")


def crops(img: Image.Image, n: int, x0: float, x1: float, rng: np.random.Generator, size: int = 32) -> list:
    w, h = img.size
    left, right = int(w * x0), int(w * x1)
    out = []
    for _ in range(n):
        s = int(rng.integers(40, min(160, right - left, h) + 1))
        x = int(rng.integers(left, right - s + 1))
        y = int(rng.integers(0, h - s + 1))
        out.append(img.crop((x, y, x + s, y + s)).resize((size, size), Image.BICUBIC))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/photos32")
    p.add_argument("--per-class", type=int, default=1000)
    p.add_argument("--test-per-class", type=int, default=200)
    p.add_argument("--size", type=int, default=32, help="patch side in pixels")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    out = Path(a.out)
    for name in PHOTOS:
        img = _photo(name)
        for split, n, x0, x1 in (("train", a.per_class, 0.0, 0.75), ("test", a.test_per_class, 0.75, 1.0)):
            if not n:
                continue
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, c in enumerate(crops(img, n, x0, x1, rng, a.size)):
                c.save(folder / f"{i:05d}.png")
        print(f"{name}: {img.size[0]}x{img.size[1]} -> {a.per_class} train + {a.test_per_class} test patches")
    print(f"wrote {out}/train and {out}/test")


if __name__ == "__main__":
    main()
