"""Benchmarks of sagan on the current device; results go to BENCHMARKS.md by hand, with this command line.

    python scripts/benchmark.py generate [--batch-size 64] [--repeats 5]
    python scripts/benchmark.py logging [--steps 150] [--interval 25]
    python scripts/benchmark.py fid [--sizes 1000 10000] [--weights PATH]

Sections:
  generate  images/s of ``sagan generate``'s path (EMA-style eval generator, seeded latents, uint8 out) at 32x32
            (configs/cifar10.yaml's G) and 64x64 (configs/celeba64.yaml's G); median of repeats after a warm-up.
  logging   cost of W&B logging (offline WandbLogger, the configs' logging interval) per training step of the
            digits config, against no logger; runs alternate (none, W&B, none, W&B), mean step time after warm-up.
  fid   time of FID for N generated 32x32 images: in-memory (``sagan.metrics.compute_metrics`` on the generator)
        versus writing PNGs and running torch-fidelity's ``fidelity`` command on the folder. Reference statistics
        are cached beforehand and shared by both paths, so only the generated side is timed. Without --weights a
        randomly initialised InceptionV3 of the same shapes is used: the same compute, so the same time.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sagan import metrics as M  # noqa: E402
from sagan.models import Generator  # noqa: E402


def header() -> str:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    return (f"device: {'cuda ' + dev if torch.cuda.is_available() else 'cpu ' + dev}, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}, cores {os.cpu_count()}")


def random_inception(path: Path) -> None:
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    torch.manual_seed(0)
    with mock.patch.object(fe, "load_state_dict_from_url", return_value=None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", return_value=None):
        model = fe.FeatureExtractorInceptionV3(M.INCEPTION, ["2048"])
    torch.save(model.state_dict(), path)


def bench_fid(sizes: list[int], weights: str | None, batch_size: int) -> list[str]:
    work = Path(tempfile.mkdtemp(prefix="sagan-bench-"))
    try:
        if weights is None:
            weights = str(work / "random-inception.pth")
            random_inception(Path(weights))
        spec = M.resolve_feature_extractor(M.INCEPTION, weights)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        g = Generator(32, z_dim=128, ch=64, num_classes=10, img_channels=3).eval().to(device)  # cifar10.yaml's G
        cache, ref = str(work / "cache"), work / "ref"
        ref.mkdir()
        n_ref = 256  # only the generated side is timed; the reference just has to exist (cached statistics)
        with torch.no_grad():
            imgs = M.to_uint8(torch.rand(n_ref, 3, 32, 32) * 2 - 1)
        for i, im in enumerate(imgs):
            Image.fromarray(im.permute(1, 2, 0).numpy()).save(ref / f"{i:05d}.png")
        t = time.perf_counter()
        M.compute_metrics(str(ref), str(ref), metrics="fid", feature_extractor=spec, input2_cache_name="bench-ref",
                          cache_root=cache, batch_size=batch_size, device=device, allow_few_samples=True)
        rows = [f"reference statistics of {n_ref} images (once, then cached): {time.perf_counter() - t:.1f} s"]
        rows.append("| generated images | in-memory (s) | PNG + `fidelity` (s) | ratio |")
        rows.append("| ---: | ---: | ---: | ---: |")
        for n in sizes:
            t = time.perf_counter()
            mem = M.compute_metrics(g, str(ref), metrics="fid", num_samples=n, feature_extractor=spec,
                                    input2_cache_name="bench-ref", cache_root=cache, batch_size=batch_size,
                                    device=device, allow_few_samples=True)
            t_mem = time.perf_counter() - t
            out = work / f"gen{n}"
            t = time.perf_counter()
            out.mkdir()
            gen = M.FidelityGenerator(g, seed=0)
            with torch.no_grad():
                for s in range(0, n, batch_size):
                    batch = gen(torch.randn(min(batch_size, n - s), g.z_dim)).cpu()
                    for j, im in enumerate(batch):
                        Image.fromarray(im.permute(1, 2, 0).numpy()).save(out / f"{s + j:06d}.png")
            cmd = [sys.executable, "-m", "torch_fidelity.fidelity", "--fid", "--input1", str(out), "--input2",
                   str(ref), "--input2-cache-name", "bench-ref", "--cache-root", cache, "--feature-extractor-weights-path",
                   weights, "--batch-size", str(batch_size), "--silent"]
            if device == "cpu":
                cmd.append("--cpu")
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(res.stderr[-2000:])
            t_png = time.perf_counter() - t
            rows.append(f"| {n} | {t_mem:.1f} | {t_png:.1f} | {t_png / t_mem:.2f}x |")
            print(rows[-1], f"(fid in-memory {mem.values['fid']:.2f})", flush=True)
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_generate(batch_size: int, repeats: int) -> list[str]:
    import statistics

    from sagan.sampling import latents_for_seeds

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configs = {32: dict(ch=64, attn_resolutions=[32], num_classes=10),  # configs/cifar10.yaml
               64: dict(ch=64, attn_resolutions=[32], num_classes=0)}  # configs/celeba64.yaml
    rows = [f"| resolution | G parameters | batch | images/s (median of {repeats}) |", "| ---: | ---: | ---: | ---: |"]
    for res, kw in configs.items():
        torch.manual_seed(0)
        g = Generator(res, z_dim=128, img_channels=3, **kw).eval().to(device)
        n_params = sum(p.numel() for p in g.parameters())
        seeds = list(range(batch_size))
        y = torch.arange(batch_size, device=device) % 10 if kw["num_classes"] else None

        def once() -> float:
            t = time.perf_counter()
            with torch.no_grad():
                z = latents_for_seeds(seeds, g.z_dim).to(device)
                img = M.to_uint8(g(z, y)).cpu()
            if device.type == "cuda":
                torch.cuda.synchronize()
            assert img.shape[0] == batch_size
            return time.perf_counter() - t

        once()  # warm-up
        times = [once() for _ in range(repeats)]
        rows.append(f"| {res}x{res} | {n_params / 1e6:.1f} M | {batch_size} | {batch_size / statistics.median(times):.1f} |")
        print(rows[-1], flush=True)
    return rows


def bench_logging(steps: int, interval: int, warmup: int = 20) -> list[str]:
    import statistics

    import pytorch_lightning as pl
    import yaml
    from pytorch_lightning.loggers import WandbLogger

    from sagan.data import SAGANData
    from sagan.module import SAGAN

    os.environ.setdefault("WANDB_MODE", "offline")
    cfg = yaml.safe_load((REPO / "configs/digits.yaml").read_text())

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.t: list[float] = []

        def on_train_batch_end(self, *args, **kwargs) -> None:
            self.t.append(time.perf_counter())

    def run(use_wandb: bool, work: Path) -> float:
        pl.seed_everything(0, verbose=False)
        dm = SAGANData(**cfg["data"])
        model = SAGAN(resolution=32, img_channels=dm.channels, num_classes=dm.num_classes, **cfg["model"])
        timer = StepTimer()
        logger = WandbLogger(project="sagan-bench", save_dir=str(work), offline=True) if use_wandb else False
        trainer = pl.Trainer(accelerator="cpu", max_steps=2 * steps, logger=logger, log_every_n_steps=interval,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[timer], default_root_dir=str(work))
        trainer.fit(model, dm)
        if use_wandb:
            import wandb

            wandb.finish()
        dt = [b - a for a, b in zip(timer.t[warmup:], timer.t[warmup + 1:])]
        return statistics.fmean(dt)

    work = Path(tempfile.mkdtemp(prefix="sagan-bench-"))
    try:
        none, wb = [], []
        for _ in range(2):
            none.append(run(False, work))
            wb.append(run(True, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    t0, t1 = statistics.fmean(none), statistics.fmean(wb)
    return [
        f"digits config, {steps} iterations per run (n_dis=1), log_every_n_steps={interval}, mean step time after "
        f"{warmup} warm-up steps, 2 runs each, alternating",
        "| logger | mean step (ms) | runs (ms) |", "| --- | ---: | ---: |",
        f"| none | {t0 * 1e3:.1f} | {', '.join(f'{x * 1e3:.1f}' for x in none)} |",
        f"| WandbLogger (offline) | {t1 * 1e3:.1f} | {', '.join(f'{x * 1e3:.1f}' for x in wb)} |",
        f"overhead of W&B logging: {100 * (t1 - t0) / t0:+.1f}% per training step",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", choices=["generate", "logging", "fid"])
    p.add_argument("--steps", type=int, default=150, help="iterations per run (logging)")
    p.add_argument("--interval", type=int, default=25, help="log_every_n_steps (logging)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--weights", help="real InceptionV3 weights (default: random weights of the same shapes)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 (generate), 100 (fid)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(header(), flush=True)
    print(f"command: python scripts/benchmark.py {' '.join(sys.argv[1:])}", flush=True)
    if a.section == "generate":
        rows = bench_generate(a.batch_size or 64, a.repeats)
    elif a.section == "logging":
        rows = bench_logging(a.steps, a.interval)
    elif a.section == "fid":
        rows = bench_fid(a.sizes, a.weights, a.batch_size or 100)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
