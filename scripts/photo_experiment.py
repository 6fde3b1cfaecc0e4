"""Scores class-conditional generators trained on the photo patches (scripts/make_photo_patches.py) offline.

    python scripts/photo_experiment.py --data data/photos32 --ckpt runs/base/checkpoints/last.ckpt \
        --ckpt runs/fix/checkpoints/last.ckpt

No pretrained feature extractor can be downloaded here, and InceptionV3 with random weights gives degenerate
features, so the features are those of a small CNN classifier trained by this script on the training patches
(10 classes, seed 0; its held-out accuracy is printed): FID, precision/recall (k=3) and the per-class spread
(mean pairwise feature distance within a class, generated / real) of 100 EMA samples per class against the
training patches, the classifier's accuracy on the class asked for, and the floor (held-out patches). Numbers are
comparable only within one run of this script (one classifier). ``--class-spread`` adds each class's spread:
a class whose samples repeat one patch reads far below the real patches' figure (the floor row). ``--histogram``
adds how many samples of each row the classifier assigns to each class.

Unconditional generators (trained on the same patches as one flat folder) are scored on as many samples, each
assigned to the class the feature classifier predicts: spread is then within predicted classes and accuracy is
not defined (printed as -). Every row also gives the effective number of classes among the classifier's
predictions, exp(entropy of the predicted-class histogram): a generator that drops or favours some kinds of patch
reads below the floor row's figure. NDB and JSD are the label-free figures that ``sagan evaluate`` and the
in-loop evaluation report (k-means bins of the real training features, :mod:`sagan.metrics`), here on this
script's features: they should rise where the effective classes fall.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sagan.diversity import bin_counts, fit_bins, ndb_jsd  # noqa: E402
from sagan.metrics import to_uint8  # noqa: E402
from sagan.sampling import generator_from_checkpoint  # noqa: E402


def load_split(root: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    xs, ys = [], []
    for c, name in enumerate(classes):
        for f in sorted((root / name).glob("*.png")):
            xs.append(np.asarray(Image.open(f).convert("RGB")))
            ys.append(c)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8
    return x, torch.tensor(ys), classes


class PatchNet(nn.Module):
    def __init__(self, n_cls: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 16, 16)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, 8, 8)
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),  # (B, 128, 1, 1)
        )
        self.head = nn.Linear(128, n_cls)

    def features(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return self.convs(x_uint8.float() / 127.5 - 1).flatten(1)  # (B, 128)

    def forward(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x_uint8))


def train_classifier(x: torch.Tensor, y: torch.Tensor, n_cls: int, epochs: int = 4) -> PatchNet:
    torch.manual_seed(0)
    net = PatchNet(n_cls)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(128):
            xb = x[idx]
            flip = torch.rand(len(idx)) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def feats(net: PatchNet, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([net.features(b) for b in x.split(500)])


def spread(f: torch.Tensor, y: torch.Tensor, n_cls: int) -> torch.Tensor:
    """Each class's mean pairwise feature distance; NaN for a class with fewer than two members."""
    out = []
    for c in range(n_cls):
        fc = f[y == c]
        out.append(torch.cdist(fc, fc).sum() / (len(fc) * (len(fc) - 1)) if len(fc) > 1 else torch.tensor(float("nan")))
    return torch.stack(out)


def effective_classes(pred: torch.Tensor, n_cls: int) -> float:
    """exp(entropy) of the histogram of predicted classes: n_cls for a uniform one, 1 when every sample is one class."""
    p = torch.bincount(pred, minlength=n_cls).double() / len(pred)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def score(net: PatchNet, f: torch.Tensor, y: torch.Tensor | None, real_f: torch.Tensor, real_spread: torch.Tensor,
          n_cls: int, bins: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
    """FID, precision/recall, spread, accuracy, effective classes and (given ``bins``: k-means centres of the real
    features and the real count in each) NDB and JSD of features ``f`` asked for classes ``y`` (None: an
    unconditional generator; its samples are grouped by the predicted class and accuracy is NaN)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    fid = fid_statistics_to_metric(fid_features_to_statistics(f.double()),
                                   fid_features_to_statistics(real_f.double()), False)["frechet_inception_distance"]
    precision, recall = calculate_precision_recall_full(f, real_f, 3)
    pred = net.head(f).argmax(1)
    acc = float((pred == y).float().mean()) if y is not None else float("nan")
    sp = spread(f, y if y is not None else pred, n_cls) / real_spread
    ndb, jsd = ndb_jsd(bins[1], bin_counts(f, bins[0])) if bins is not None else (float("nan"), float("nan"))
    return {"fid": fid, "precision": float(precision), "recall": float(recall), "spread": float(sp.nanmean()),
            "spread_min": float(sp[~sp.isnan()].min()), "accuracy": acc, "class_spread": sp.tolist(),
            "effective_classes": effective_classes(pred, n_cls), "histogram": torch.bincount(pred, minlength=n_cls).tolist(),
            "ndb": ndb, "jsd": jsd}


def _num(v: float, fmt: str = ".3f") -> str:
    return "-" if v != v else format(v, fmt)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder with train/ and test/ class subfolders")
    p.add_argument("--ckpt", action="append", default=[], help="checkpoints to score (EMA generator)")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--class-spread", action="store_true",
                   help="also print each class's spread (generated over real): which classes repeat one patch")
    p.add_argument("--histogram", action="store_true",
                   help="also print how many samples the feature classifier assigns to each class: which kinds of "
                        "image an unconditional generator drops")
    a = p.parse_args()
    x, y, classes = load_split(Path(a.data) / "train")
    tx, ty, _ = load_split(Path(a.data) / "test")
    n_cls = len(classes)
    net = train_classifier(x, y, n_cls)
    with torch.no_grad():
        test_acc = float((net(tx).argmax(1) == ty).float().mean())
    print(f"feature classifier: {len(x)} training patches, held-out accuracy {test_acc:.3f}")
    real_f = feats(net, x)
    real_spread = spread(real_f, y, n_cls)
    centres = fit_bins(real_f)
    bins = (centres, bin_counts(real_f, centres)) if centres is not None else None
    # the floor: as many held-out patches per class as generated ones
    gen = torch.Generator().manual_seed(0)
    pick = torch.cat([torch.nonzero(ty == c).flatten()[torch.randperm(int((ty == c).sum()), generator=gen)][:a.per_class]
                      for c in range(n_cls)])
    rows = {"real held-out (floor)": score(net, feats(net, tx[pick]), ty[pick], real_f, real_spread, n_cls, bins)}
    for ck in a.ckpt:
        g = generator_from_checkpoint(ck)
        gen = torch.Generator().manual_seed(0)
        conditional = g.num_classes > 0
        if conditional and g.num_classes != n_cls:
            sys.exit(f"{ck}: the generator has {g.num_classes} classes, the data {n_cls}: score it on its own data")
        labels = torch.arange(n_cls).repeat(a.per_class)
        z = torch.randn(len(labels), g.z_dim, generator=gen)
        with torch.no_grad():
            imgs = torch.cat([to_uint8(g(zb, yb if conditional else None))
                              for zb, yb in zip(z.split(100), labels.split(100))])
        rows[ck] = score(net, feats(net, imgs), labels if conditional else None, real_f, real_spread, n_cls, bins)
    floor = rows["real held-out (floor)"]["fid"]
    print("| model | FID | x floor | precision | recall | spread | accuracy | classes (effective) | NDB | JSD |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        print(f"| {name} | {r['fid']:.3f} | {r['fid'] / floor:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
              f"{r['spread']:.3f} | {_num(r['accuracy'])} | {r['effective_classes']:.2f} | {_num(r['ndb'], '.2f')} | "
              f"{_num(r['jsd'], '.4f')} |")
    if a.class_spread:
        print("\n| model | " + " | ".join(classes) + " |")
        print("| --- |" + " ---: |" * n_cls)
        for name, r in rows.items():
            print(f"| {name} | " + " | ".join(_num(v, ".2f") for v in r["class_spread"]) + " |")
    if a.histogram:
        print("\n| model (samples per predicted class) | " + " | ".join(classes) + " |")
        print("| --- |" + " ---: |" * n_cls)
        for name, r in rows.items():
            print(f"| {name} | " + " | ".join(str(v) for v in r["histogram"]) + " |")


if __name__ == "__main__":
    main()
