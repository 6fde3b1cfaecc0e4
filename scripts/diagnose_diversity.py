"""Why does the digits generator lose its variety? Trains a digits config and measures, every ``--every`` iterations:

* D's mean logit on training digits vs held-out digits (a growing gap = D memorising the 1,437 training images);
* for the generator as the demo samples it (EMA, eval-mode BN), the raw generator in eval mode (running BN
  statistics) and the raw generator in train mode (batch statistics, as the official SAGAN code always samples):
  FID and precision/recall on digits-mlp features against the training digits, the per-class spread (mean
  pairwise feature distance within a class, generated / real), and the digits-mlp classifier's accuracy.

    python scripts/diagnose_diversity.py --config configs/digits.yaml --iters 1000 --every 100 \
        [--set model.lr_g=0.0001 ...] [--out diag.jsonl]

Each line printed (and written to ``--out``) is one JSON record per (iteration, generator mode).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sagan.data import SAGANData, digits_to_images, load_digits_arrays  # noqa: E402
from sagan.features import DIGITS_WEIGHTS, DigitsMLP, uint8_to_digit_inputs  # noqa: E402
from sagan.metrics import to_uint8  # noqa: E402
from sagan.module import SAGAN, _WarmupEMA  # noqa: E402


def _set(cfg: dict, dotted: str) -> None:
    key, value = dotted.split("=", 1)
    node = cfg
    *path, last = key.split(".")
    for p in path:
        node = node.setdefault(p, {})
    node[last] = yaml.safe_load(value)


class Probe:
    def __init__(self, n_per_class: int = 100, seed: int = 0, resolution: int = 32) -> None:
        self.mlp = DigitsMLP()
        self.mlp.load_state_dict(torch.load(DIGITS_WEIGHTS, weights_only=True))
        self.mlp.eval()
        x8, y = load_digits_arrays("train")
        self.real_x = digits_to_images(x8, resolution)
        self.real_y = y
        self.real_f = self.features(self.real_x)
        t8, ty = load_digits_arrays("test")
        self.test_x, self.test_y = digits_to_images(t8, resolution), ty
        self.real_spread = torch.tensor([self._spread(self.real_f[y == c]) for c in range(10)])
        self.n_per_class, self.seed = n_per_class, seed

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.features(uint8_to_digit_inputs(to_uint8(x)))

    @staticmethod
    def _spread(f: torch.Tensor) -> float:
        d = torch.cdist(f, f)
        n = len(f)
        return float(d.sum() / (n * (n - 1)))

    @torch.no_grad()
    def generate(self, g: torch.nn.Module, z_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        y = torch.arange(10).repeat(self.n_per_class)
        y = y[torch.randperm(len(y), generator=gen)]  # mixed-class batches, as in training
        z = torch.randn(len(y), z_dim, generator=gen)
        imgs = torch.cat([g(zb, yb) for zb, yb in zip(z.split(100), y.split(100))])
        return imgs, y

    @torch.no_grad()
    def measure(self, g: torch.nn.Module, z_dim: int) -> dict[str, float]:
        from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
        from torch_fidelity.metric_prc import calculate_precision_recall_full

        imgs, y = self.generate(g, z_dim)
        f = self.features(imgs)
        fid = fid_statistics_to_metric(fid_features_to_statistics(f.double()),
                                       fid_features_to_statistics(self.real_f.double()), False)
        precision, recall = calculate_precision_recall_full(f, self.real_f, 3)
        spread = torch.tensor([self._spread(f[y == c]) for c in range(10)])
        acc = float((self.mlp.head(f).argmax(1) == y).float().mean())
        return {"fid": fid["frechet_inception_distance"], "precision": precision, "recall": recall,
                "spread": float((spread / self.real_spread).mean()), "spread_min": float((spread / self.real_spread).min()),
                "acc": acc}

    @torch.no_grad()
    def d_gap(self, d: torch.nn.Module) -> dict[str, float]:
        was = d.training
        d.eval()
        n = len(self.test_y)
        gen = torch.Generator().manual_seed(1)
        idx = torch.randperm(len(self.real_y), generator=gen)[:n]
        tr = d(self.real_x[idx], self.real_y[idx]).mean()
        te = d(self.test_x, self.test_y).mean()
        d.train(was)
        return {"d_train": float(tr), "d_test": float(te), "d_gap": float(tr - te)}


class ExtraEMA(pl.Callback):
    """Further EMA copies of G beside the module's own, with other warm-ups: ``decay = min(cap, (1 + n) / (k + n))``
    (the module's is k = 10, cap = ema_decay). Each copy stands in for the module's EMA while the module's own
    update (``_update_ema``) and sampling (``ema_generator``, standing statistics) run on it, so one training run
    compares several averaging horizons, each updated and measured exactly as the module's."""

    def __init__(self, specs: list[str]) -> None:
        self.specs, self.copies, self._last = specs, {}, -1

    def on_train_start(self, trainer, module) -> None:
        for spec in self.specs:
            k, cap = (float(v) for v in spec.split(":"))
            c = copy.deepcopy(module.g_ema)
            c.multi_avg_fn = _WarmupEMA(cap, True, warmup_k=k)
            self.copies[f"ema_k{spec}"] = c

    @staticmethod
    @contextlib.contextmanager
    def _standing_in(module, c):
        own = module.g_ema
        module.g_ema, module._ema_bn_fresh_at = c, None
        try:
            yield
        finally:
            module.g_ema, module._ema_bn_fresh_at = own, None

    @torch.no_grad()
    def on_train_batch_end(self, trainer, module, *a, **k) -> None:
        if module.g_steps == self._last:
            return
        self._last = module.g_steps
        for c in self.copies.values():
            with self._standing_in(module, c):
                module._update_ema()

    def generators(self, module):
        """(name, generator) for each copy, its standing statistics computed as the module's own are."""
        for name, c in self.copies.items():
            with self._standing_in(module, c):
                yield name, module.ema_generator()


class Diagnose(pl.Callback):
    def __init__(self, probe: Probe, every: int, out: Path | None, modes: list[str],
                 extra: ExtraEMA | None = None) -> None:
        self.probe, self.every, self.out, self._last, self.modes = probe, every, out, -1, modes
        self.extra = extra
        self._train_s, self._since = 0.0, None  # training time, the probes' own time left out

    def on_train_start(self, trainer, module) -> None:
        self._since = time.perf_counter()

    def on_train_batch_end(self, trainer, module, *a, **k) -> None:
        step = module.g_steps
        if step == self._last or step % self.every:
            return
        self._last = step
        self._train_s += time.perf_counter() - self._since
        recs = []
        dg = self.probe.d_gap(module.discriminator)
        g_ema = module.ema_generator()
        raw_eval = copy.deepcopy(module.generator).eval()
        raw_train = copy.deepcopy(module.generator).train()  # a copy: its BN running statistics may move
        for mode, g in (("ema_eval", g_ema), ("raw_eval", raw_eval), ("raw_train", raw_train)):
            if mode not in self.modes:
                continue
            recs.append({"iteration": step, "mode": mode, **self.probe.measure(g, module.z_dim), **dg,
                         "train_s": self._train_s})
        for mode, g in (self.extra.generators(module) if self.extra else ()):
            recs.append({"iteration": step, "mode": mode, **self.probe.measure(g, module.z_dim), **dg,
                         "train_s": self._train_s})
        module.generator.train()
        for r in recs:
            line = json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
            print(line, flush=True)
            if self.out:
                with open(self.out, "a") as f:
                    f.write(line + "\n")
        self._since = time.perf_counter()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/digits.yaml")
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="override, e.g. model.lr_g=0.0001")
    p.add_argument("--out", type=Path)
    p.add_argument("--modes", default="ema_eval,raw_eval,raw_train", help="generator modes to measure")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                   help="torch CPU threads (1 to run several diagnoses side by side on a many-core machine)")
    p.add_argument("--extra-ema", default="", help="further EMA copies measured beside the module's, as "
                   "comma-separated k:cap (decay = min(cap, (1 + n) / (k + n))), e.g. 4:0.999,20:0.999")
    a = p.parse_args()
    cfg = yaml.safe_load(Path(a.config).read_text())
    for s in a.set:
        _set(cfg, s)
    torch.set_num_threads(a.threads)
    pl.seed_everything(a.seed, verbose=False)
    dm = SAGANData(**cfg["data"])
    mcfg = dict(cfg["model"])
    model = SAGAN(resolution=dm.resolution, img_channels=dm.channels, num_classes=dm.num_classes, **mcfg)
    n_dis = model.n_dis
    extra = ExtraEMA(a.extra_ema.split(",")) if a.extra_ema else None
    trainer = pl.Trainer(accelerator="cpu", max_steps=a.iters * (n_dis + 1), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[*([extra] if extra else []),
                                    Diagnose(Probe(resolution=dm.resolution), a.every, a.out, a.modes.split(','), extra)], default_root_dir="/tmp/diag")
    trainer.fit(model, dm)


if __name__ == "__main__":
    main()
