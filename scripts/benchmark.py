"""Benchmarks of sagan on the current device; results go to BENCHMARKS.md by hand, with this command line.

    python scripts/benchmark.py attention [--repeats 5]
    python scripts/benchmark.py train [--resolutions 32 64 128] [--modes eager channels_last bf16 compile]
        [--batch-size 16 ...] [--profile DIR]
        on a GPU: --modes eager tf32 bf16 bf16_compile bf16_cudagraphs --batch-size 64 128 256 --profile prof/
    python scripts/benchmark.py ddp [--iters 30]
    python scripts/benchmark.py generate [--batch-size 64] [--repeats 5]
    python scripts/benchmark.py logging [--steps 150] [--interval 25]
    python scripts/benchmark.py fid [--sizes 1000 10000] [--weights PATH]
    python scripts/benchmark.py loader --root data/photos64/train [--res 64] [--workers 0 1 2] [--batches 60]
    python scripts/benchmark.py decode [--resolutions 32 64 128] [--repeats 5]   (needs scikit-image)
    python scripts/benchmark.py ema [--repeats 200]
    python scripts/benchmark.py reuse [--steps 150] [--repeats 3]
    python scripts/benchmark.py reference [--sizes 100000 300000 1000000]

Sections:
  attention attention block (SelfAttention2d: its 1x1 convs, pooling and output projection included) forward +
            backward with a fixed upstream gradient, explicit softmax(QK^T)V vs F.scaled_dot_product_attention, batch 16,
            C=64, feature maps 16/32/64 (and 128 on a GPU), with and without key/value pooling: median time and
            peak memory (CPU: resident-set high-water mark above the level before the run, each case in a fresh
            process; CUDA: max_memory_allocated above the baseline).
  train     one training iteration (n_dis=1: a D step and a G step, through Lightning) in images/s at 32, 64, 128
            with the shipped configs' widths, batch 16 (--batch-size, several: each), on the GPU when there is one,
            for eager (float32 NCHW, no TF32) and, all channels_last: channels_last (float32); tf32, bf16 and fp16
            autocast, bf16_compile (torch.compile) and bf16_cudagraphs (compile mode 'reduce-overhead'), these
            with TF32 and cuDNN autotuning as configs/trainer/gpu.yaml sets them; compile (float32 compiled);
            plus peak GPU memory, the FLOPs of one iteration (torch.utils.flop_counter) over its time, next to
            the rate of a large torch.mm on the same device in float32 and bfloat16. --profile DIR: a
            torch.profiler summary per case (GPU kernel time by kind against the wall time, kernel launches per
            iteration, torch's table) of 5 more iterations.
  ddp       training throughput of the digits config, 1 process vs 2 processes (Lightning DDP, GANDDPStrategy) on
            the current machine, at the same global batch; on a CPU the processes share the cores.
  generate  images/s of ``sagan generate``'s path (``generate_images``: per-seed latents, eval generator, one image
            per forward pass on the CPU, uint8 out) at 32x32
            (configs/cifar10.yaml's G) and 64x64 (configs/celeba64.yaml's G); median of repeats after a warm-up.
  logging   cost of W&B logging (offline WandbLogger, the configs' logging interval) per training step of the
            digits config, against no logger; runs alternate (none, W&B, none, W&B), mean step time after warm-up.
  fid       time of the in-loop evaluation (``sagan.metrics.Evaluator.generator``: generate N 32x32 images with the
            CIFAR-10 config's G, InceptionV3 features, FID + precision/recall) on the current device; the reference
            features are extracted once beforehand and not timed. Without --weights a randomly initialised
            InceptionV3 of the same shapes is used: the same compute, so the same time.
  loader    images/s that the training loader serves (batch 64, uint8 batches as the training step receives them,
            shuffled, median over ``--batches`` after a warm-up epoch start) for an image folder (PIL decode +
            resize per image, in worker processes), for a zip archive of the same files read in place, and for
            the same folder prepared once with ``sagan prepare``
            (memory-mapped and in memory), per worker count; plus the time ``sagan prepare`` took and, in the same
            run, the training step's own images/s at that resolution (configs/celeba64.yaml, batch 64, eager fp32
            on this device), so the table says whether training would wait for data, and the time a scan of the
            folder and of the zip takes.
  decode    one JPEG photograph through the image-folder path's decoder (``sagan.data.ImageLoader``: a reduced-scale
            DCT decode, PIL's ``draft``) against the full decode and the same resize / crop, per source size
            (scikit-image's photographs, upscaled and saved at quality 92) and target resolution: ms per image
            (median of repeats, one thread) and the PSNR of the fast decode's pixels against the full decode's.
  ema       time of one EMA update of the generator (``SAGAN._update_ema``: the weights averaged, G's buffers copied
            but for the EMA's own spectral-norm vectors, one power iteration of those) for the digits and CIFAR-10
            configs' G: median of --repeats after a warm-up, and the torch operators one update dispatches
            (torch.profiler's aten:: events, nested ones included; the host work that bounds a small GPU step).
  reuse     iteration time of the digits config (``make demo``'s recipe, its data, no logger) with
            ``model.reuse_fakes`` off (the G step draws fresh images) and on (it trains on the D step's); runs
            alternate (off, on, off, on, ...), mean iteration time after a warm-up, the ratio per pair.
  reference memory and time of a reference set's statistics (``Evaluator.load_reference``, no cache: one
            streaming pass that holds running moments and the rows the spread, the bins and KID / precision-recall
            read) against extracting and holding every feature of it (``Evaluator._dataset_features``, what the
            reference did before 2026-11-24 and what scoring an image set does), per set size: the 1,437 training
            digits repeated to the size, digits-mlp features (64-d), one process, each case in a fresh process;
            peak resident memory above the level after a warm-up on a small set. The cases run with glibc's
            mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_), so the peak counts what the code holds:
            with glibc's default (a threshold that rises as blocks are freed), the freed per-batch temporaries
            stay in the heap by a varying amount, measured 0.1-6 GB at a million images in either mode.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
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
    """Time of the in-loop evaluation path (``sagan.metrics.Evaluator.generator``: generate, embed, score) for N
    samples of the CIFAR-10 config's generator, FID + precision/recall, on the current device."""
    work = Path(tempfile.mkdtemp(prefix="sagan-bench-"))
    try:
        if weights is None:
            weights = str(work / "random-inception.pth")
            random_inception(Path(weights))
        spec = M.resolve_feature_extractor(M.INCEPTION, weights)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        g = Generator(32, z_dim=128, ch=64, num_classes=10, img_channels=3).eval().to(device)  # cifar10.yaml's G
        ev = M.Evaluator(spec, metrics="fid,prc", device=device, batch_size=batch_size, allow_few_samples=True)
        n_ref = max(sizes)  # precision/recall compare with as many real images as generated ones
        ref = torch.utils.data.TensorDataset(torch.rand(n_ref, 3, 32, 32) * 2 - 1, torch.zeros(n_ref, dtype=torch.long))
        t = time.perf_counter()
        ev.load_reference(ref)
        rows = [f"reference features of {n_ref} images (once per run, then cached): {time.perf_counter() - t:.1f} s",
                "", "| generated images | FID + precision/recall (s) | images/s |", "| ---: | ---: | ---: |"]
        for n in sizes:
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            ev.generator(g, n)
            if device == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
            rows.append(f"| {n} | {dt:.1f} | {n / dt:,.0f} |")
            print(rows[-1], flush=True)
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_generate(batch_size: int, repeats: int) -> list[str]:
    import statistics

    from sagan.generate import generate_images

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
            img = M.to_uint8(generate_images(g, seeds, y.cpu() if y is not None else None, None, batch_size,
                                             device, progress=False))
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

    def run(use_wandb: bool, work: Path, log_every_batch: bool = False) -> float:
        pl.seed_everything(0, verbose=False)
        dm = SAGANData(**cfg["data"])
        model = SAGAN(resolution=32, img_channels=dm.channels, num_classes=dm.num_classes, **cfg["model"])
        if log_every_batch:  # as before: self.log on every batch, Lightning keeping every log_every_n_steps-th
            model._logs_this_batch = lambda: True
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
        none, wb, every = [], [], []
        for _ in range(2):
            none.append(run(False, work))
            wb.append(run(True, work))
            every.append(run(True, work, log_every_batch=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    t0, t1, t2 = statistics.fmean(none), statistics.fmean(wb), statistics.fmean(every)
    return [
        f"digits config, {steps} iterations per run (n_dis=1), log_every_n_steps={interval}, mean step time after "
        f"{warmup} warm-up steps, 2 runs each, alternating",
        "| logger | mean step (ms) | runs (ms) |", "| --- | ---: | ---: |",
        f"| none | {t0 * 1e3:.1f} | {', '.join(f'{x * 1e3:.1f}' for x in none)} |",
        f"| WandbLogger (offline) | {t1 * 1e3:.1f} | {', '.join(f'{x * 1e3:.1f}' for x in wb)} |",
        f"| WandbLogger, `self.log` on every batch (before) | {t2 * 1e3:.1f} | {', '.join(f'{x * 1e3:.1f}' for x in every)} |",
        f"overhead of W&B logging: {100 * (t1 - t0) / t0:+.1f}% per training step; logging on every batch "
        f"instead of the logged ones: {100 * (t2 - t1) / t1:+.1f}%",
    ]


def bench_reuse(steps: int, repeats: int, warmup: int = 20) -> list[str]:
    import statistics

    import pytorch_lightning as pl
    import yaml

    from sagan.data import SAGANData
    from sagan.module import SAGAN

    cfg = yaml.safe_load((REPO / "configs/digits.yaml").read_text())

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.t: list[float] = []

        def on_train_batch_end(self, *args, **kwargs) -> None:
            self.t.append(time.perf_counter())

    def run(reuse: bool, work: Path) -> float:
        pl.seed_everything(0, verbose=False)
        dm = SAGANData(**cfg["data"])
        model = SAGAN(resolution=32, img_channels=dm.channels, num_classes=dm.num_classes,
                      **{**cfg["model"], "reuse_fakes": reuse})
        timer = StepTimer()
        trainer = pl.Trainer(accelerator="cpu", max_steps=2 * steps, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                             default_root_dir=str(work))
        trainer.fit(model, dm)
        dt = [b - a for a, b in zip(timer.t[warmup:], timer.t[warmup + 1:])]
        return statistics.fmean(dt)

    work = Path(tempfile.mkdtemp(prefix="sagan-bench-"))
    try:
        off, on = [], []
        for _ in range(repeats):
            off.append(run(False, work))
            on.append(run(True, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = [a / b for a, b in zip(off, on)]
    return [
        f"digits config (make demo's recipe), {steps} iterations per run, mean iteration time after {warmup} "
        f"warm-up iterations, {repeats} runs each, alternating",
        "| reuse_fakes | mean iteration (ms) | runs (ms) |", "| --- | ---: | ---: |",
        f"| off (fresh images for the G step) | {statistics.fmean(off) * 1e3:.1f} | "
        f"{', '.join(f'{x * 1e3:.1f}' for x in off)} |",
        f"| on (the D step's images) | {statistics.fmean(on) * 1e3:.1f} | {', '.join(f'{x * 1e3:.1f}' for x in on)} |",
        f"speed-up per pair (off / on): {', '.join(f'{r:.3f}x' for r in ratios)}; mean {statistics.fmean(ratios):.3f}x",
    ]


def _reference_case(n: int, mode: str) -> dict:
    """One reference case in this process: seconds and peak resident memory above the level after a warm-up."""
    import resource

    from torch.utils.data import Dataset

    from sagan.data import SAGANData

    digits = M.UInt8Images(SAGANData("digits", resolution=32).build_dataset("train"), with_labels=True)
    base_items = [digits[i] for i in range(len(digits))]

    class Repeated(Dataset):
        def __init__(self, size: int) -> None:
            self.size = size

        def __len__(self) -> int:
            return self.size

        def __getitem__(self, i: int):
            return base_items[i % len(base_items)]

    ev = M.Evaluator("digits-mlp", "fid,prc,kid", device="cpu", batch_size=1000)
    ev.load_reference(Repeated(5000), num_classes=10)  # libraries, allocator arenas: in the baseline
    ev._dataset_features(Repeated(5000), "warm-up")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    if mode == "stream":
        ev.load_reference(Repeated(n), num_classes=10)
    else:
        feats, _ = ev._dataset_features(Repeated(n), "all features")
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"s": seconds, "peak_mib": peak / 2**20}


def bench_reference(sizes: list[int]) -> list[str]:
    import json

    rows = ["| reference images | features alone (64-d float32) | held: peak MiB | held: s | streamed: peak MiB "
            "| streamed: s |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n in sizes:
        out = {}
        for mode in ("hold", "stream"):
            cmd = [sys.executable, __file__, "_reference_case", "--sizes", str(n), "--mode", mode]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # see the docstring
            out[mode] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                                  env=env).stdout.splitlines()[-1])
        rows.append(f"| {n:,} | {n * 64 * 4 / 2**20:.0f} MiB | {out['hold']['peak_mib']:.0f} | {out['hold']['s']:.1f} | "
                    f"{out['stream']['peak_mib']:.0f} | {out['stream']['s']:.1f} |")
    return rows


# ------------------------------------------------------------------------------------------------- attention
def _attn_case(res: int, pool: bool, explicit: bool, repeats: int, batch: int = 16, channels: int = 64) -> dict:
    """One attention case in this process: median fwd+bwd time and peak memory above the pre-run level."""
    import resource
    import statistics

    from sagan.layers import SelfAttention2d

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    m = SelfAttention2d(channels, pool=pool, use_sdpa=not explicit).to(device)
    with torch.no_grad():
        m.gamma.fill_(0.5)
    x = torch.randn(batch, channels, res, res, device=device, requires_grad=True)
    gy = torch.randn_like(x)  # a fixed upstream gradient, allocated before the baseline

    def once() -> float:
        t = time.perf_counter()
        m(x).backward(gy)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    # initialise the libraries (oneDNN, thread pools, allocator arenas) on a small input first, so the baseline
    # holds them and the peak counts only what this size needs
    small = torch.randn(2, channels, 8, 8, device=device, requires_grad=True)
    m(small).square().mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    once()
    times = [once() for _ in range(repeats)]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"ms": 1e3 * statistics.median(times), "peak_mib": peak / 2**20}


def bench_attention(repeats: int) -> list[str]:
    import json

    sizes = [16, 32, 64] + ([128] if torch.cuda.is_available() else [])
    rows = ["| feature map | keys pooled | explicit ms | SDPA ms | explicit peak MiB | SDPA peak MiB | memory ratio |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for res in sizes:
        for pool in (True, False):
            out = {}
            for explicit in (True, False):
                cmd = [sys.executable, __file__, "_attn_case", "--res", str(res), "--repeats", str(repeats)]
                cmd += ["--pool"] if pool else []
                cmd += ["--explicit"] if explicit else []
                res_ = subprocess.run(cmd, capture_output=True, text=True)
                if res_.returncode != 0:
                    out[explicit] = None
                    print(res_.stderr[-800:], file=sys.stderr)
                else:
                    out[explicit] = json.loads(res_.stdout.strip().splitlines()[-1])
            e, f = out[True], out[False]
            fmt = lambda d, k: f"{d[k]:.1f}" if d else "failed"  # noqa: E731
            ratio = f"{f['peak_mib'] / e['peak_mib']:.3f}" if e and f and e["peak_mib"] > 0 else "-"
            rows.append(f"| {res}x{res} (N={res * res}) | {'yes' if pool else 'no'} | {fmt(e, 'ms')} | {fmt(f, 'ms')} "
                        f"| {fmt(e, 'peak_mib')} | {fmt(f, 'peak_mib')} | {ratio} |")
            print(rows[-1], flush=True)
    return rows


def bench_ema(repeats: int) -> list[str]:
    import statistics

    import yaml

    from sagan.layers import spectral_norm_modules
    from sagan.module import SAGAN

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = ["| config | G parameters | SN weights in G | EMA update ms (median) | aten ops per update |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for config, classes in (("configs/digits.yaml", 10), ("configs/cifar10.yaml", 10)):
        cfg = yaml.safe_load((REPO / config).read_text())
        hp = {k: v for k, v in cfg["model"].items() if k != "compile"}
        hp.update(resolution=cfg["data"]["resolution"], img_channels=1 if "digits" in config else 3,
                  num_classes=classes)
        model = SAGAN(**hp).to(dev)
        model.configure_model()  # channels_last, as in training
        times = []
        for i in range(repeats + 10):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model._update_ema()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= 10:
                times.append(time.perf_counter() - t)
        with torch.profiler.profile() as prof:
            model._update_ema()
        ops = sum(e.name.startswith("aten::") for e in prof.events())
        n_params = sum(p.numel() for p in model.generator.parameters())
        rows.append(f"| {config} | {n_params / 1e6:.2f} M | {len(spectral_norm_modules(model.generator))} | "
                    f"{statistics.median(times) * 1e3:.2f} | {ops} |")
        print(rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------------------------- training
TRAIN_WIDTHS = {32: ("configs/cifar10.yaml", dict(g_ch=64, d_ch=64, g_ch_mult=[4, 4, 4, 4], d_ch_mult=[2, 2, 2, 2],
                                                   g_attn=[32], d_attn=[8], num_classes=10)),
                64: ("configs/celeba64.yaml", dict(g_ch=64, d_ch=64, g_attn=[32], d_attn=[32], num_classes=0)),
                128: ("configs/celeba64.yaml widths at 128", dict(g_ch=64, d_ch=64, g_attn=[32], d_attn=[32],
                                                                   num_classes=0))}


def _count_cpu_attention_flops() -> None:
    """Give torch's FLOP counter the formula of the CPU's fused attention kernel where it lacks one (torch 2.14
    counts the CUDA SDPA kernels only, so the attention block's matmuls went uncounted on the CPU; 2.15 counts them):
    the CUDA kernels' formula, same arguments up front. Without it a CPU row's FLOPs depend on the torch version."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    for op, formula in ((aten._scaled_dot_product_flash_attention_for_cpu, fc.sdpa_flop),
                        (aten._scaled_dot_product_flash_attention_for_cpu_backward, fc.sdpa_backward_flop)):
        if op not in fc.flop_registry and op.default not in fc.flop_registry:
            fc.register_flop_formula(op, get_raw=True)(formula)  # torch's own, already taking shapes


def _train_case(res: int, mode: str, iters: int, warmup: int, batch: int = 16, profile: str | None = None) -> dict:
    """One training configuration in this process: median iteration time after ``warmup`` iterations, the FLOPs of
    one iteration (eager and bf16), and with ``profile`` a torch.profiler table of ``iters`` iterations written to
    that path (GPU kernel time by kind next to the wall time, so the gap to the matmul rate can be read off)."""
    import statistics

    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from sagan.module import SAGAN

    pl.seed_everything(0, verbose=False)
    _, widths = TRAIN_WIDTHS[res]
    cuda = torch.cuda.is_available()
    # eager = true float32, NCHW, cuDNN's default algorithm choice; every other mode is channels_last and, on a
    # GPU, what configs/trainer/gpu.yaml switches on besides precision: TF32 for float32 work, cuDNN autotuning
    fast = mode != "eager" and mode != "channels_last"
    torch.set_float32_matmul_precision("high" if fast else "highest")
    torch.backends.cudnn.allow_tf32 = fast
    torch.backends.cudnn.benchmark = fast and cuda
    compile_ = {"compile": True, "bf16_compile": True, "bf16_cudagraphs": "reduce-overhead"}.get(mode, False)
    model = SAGAN(resolution=res, img_channels=3, z_dim=128, n_dis=1, channels_last=mode != "eager",
                  compile=compile_, **widths)
    prof_iters = min(iters, 5)
    steps = iters + warmup + (prof_iters if profile else 0)
    n = batch * (steps + 1)
    data = TensorDataset(torch.rand(n, 3, res, res) * 2 - 1, torch.randint(0, max(1, widths["num_classes"]), (n,)))
    times: list[float] = []
    prof_box: dict = {}

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch_, batch_idx: int) -> None:
            if profile and batch_idx == iters + warmup:
                from torch.profiler import ProfilerActivity, profile as torch_profile

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                prof_box["p"] = torch_profile(activities=acts)
                prof_box["p"].__enter__()
                prof_box["t0"] = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch_, batch_idx: int) -> None:
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            if "p" in prof_box and batch_idx == steps - 1:  # stop before fit's teardown (which copies G and D
                prof_box["p"].__exit__(None, None, None)    # back to the CPU)
                prof_box["wall"] = times[-1] - prof_box["t0"]

    precision = {"bf16": "bf16-mixed", "fp16": "16-mixed", "bf16_compile": "bf16-mixed",
                 "bf16_cudagraphs": "bf16-mixed"}.get(mode, "32-true")
    trainer = pl.Trainer(accelerator="auto", devices=1, max_steps=2 * steps, precision=precision,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Timer()])
    t0 = time.perf_counter()
    trainer.fit(model, DataLoader(data, batch_size=batch, drop_last=True))
    dts = [b - a for a, b in zip(times[warmup - 1:iters + warmup - 1], times[warmup:iters + warmup])]
    out = {"images_s": batch / statistics.median(dts), "iter_s": statistics.median(dts),
           "total_s": time.perf_counter() - t0, "flops": None, "peak_gib": None}
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if "wall" in prof_box:
        Path(profile).write_text(_profile_summary(prof_box["p"], prof_box["wall"], prof_iters, mode, res, batch))
    if mode in ("eager", "bf16"):
        from torch.utils.flop_counter import FlopCounterMode

        _count_cpu_attention_flops()
        model.train()
        x = torch.rand(batch, 3, res, res, device=model.device) * 2 - 1
        y = torch.randint(0, max(1, widths["num_classes"]), (batch,), device=model.device)
        with FlopCounterMode(display=False) as fc:  # one iteration: D step (G fwd, D fwd+bwd on 2B) + G step
            z, yf = model.sample_latents(batch)
            with torch.no_grad():
                fake = model.generator(z, yf)
            logits = model.discriminator(torch.cat([x, fake]), torch.cat([y, yf]) if model.conditional else None)
            model.d_loss_fn(logits[:batch], logits[batch:]).backward()
            z, yf = model.sample_latents(batch)
            model.g_loss_fn(model.discriminator(model.generator(z, yf), yf)).backward()
        out["flops"] = fc.get_total_flops()
    return out


def _kernel_kind(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("conv", "implicit", "dgrad", "wgrad", "fprop", "cudnn", "winograd")):
        return "convolution (cuDNN)"  # cuDNN's Hopper kernels: sm90_xmma_{fprop,dgrad,wgrad}_implicit_gemm_*
    if any(k in n for k in ("gemm", "cutlass", "matmul", "nvjet", "cublas")):
        return "matrix multiply (cuBLAS)"
    if any(k in n for k in ("flash", "fmha", "attention", "efficient")):
        return "attention (SDPA)"
    if any(k in n for k in ("batch_norm", "batchnorm", "bn_", "welford")):
        return "batch norm"
    if any(k in n for k in ("reduce", "norm_kernel", "sum_", "mean")):
        return "reductions (spectral norm, losses, grad norm)"
    if any(k in n for k in ("multi_tensor", "foreach", "adam")):
        return "optimizer (foreach Adam, EMA)"
    if "copy" in n or "memcpy" in n or "memset" in n or "cat" in n:
        return "copies / layout"
    return "elementwise and other"


def _profile_summary(prof, wall: float, iters: int, mode: str, res: int, batch: int) -> str:
    """GPU kernel time by kind over the profiled iterations, against their wall time; then torch's own table."""
    events = [e for e in prof.events() if getattr(e, "device_type", None) is not None
              and str(e.device_type).endswith("CUDA") and e.device_time > 0]
    by_kind: dict[str, float] = {}
    for e in events:
        by_kind[_kernel_kind(e.name)] = by_kind.get(_kernel_kind(e.name), 0.0) + e.device_time / 1e6
    gpu = sum(by_kind.values())
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    if gpu == 0:  # a CPU run: torch's table alone
        return (f"profile: {res}x{res}, mode {mode}, batch {batch}, {iters} iterations, wall "
                f"{wall * 1e3 / iters:.2f} ms / iteration (no GPU kernels)\n\n"
                + prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70))
    lines = [f"profile: {res}x{res}, mode {mode}, batch {batch}, {iters} iterations, wall {wall * 1e3 / iters:.2f} ms"
             f" / iteration, GPU kernels {gpu * 1e3 / iters:.2f} ms / iteration "
             f"(GPU busy {100 * gpu / wall:.0f}% of the wall time)", "",
             "| kernel kind | ms / iteration | share of kernel time |", "| --- | ---: | ---: |"]
    for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {kind} | {t * 1e3 / iters:.2f} | {100 * t / gpu:.0f}% |")
    lines += ["", f"kernel launches / iteration: {len(events) / iters:.0f}", ""]
    lines.append(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70))
    return "\n".join(lines)


def _mm_rate(device: torch.device, dtype: torch.dtype = torch.float32, repeats: int = 10) -> float:
    """FLOP/s of a large square torch.mm on random data (8192 on a GPU, 4096 on the CPU), median after warm-up."""
    import statistics

    n = 8192 if device.type == "cuda" else 4096
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ts = []
    for i in range(repeats + 3):
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(ts[3:])


def bench_train(resolutions: list[int], modes: list[str], iters: int, warmup: int, batches: list[int],
                profile_dir: str | None = None) -> list[str]:
    import json

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    mm = {"fp32": _mm_rate(device), "bf16": _mm_rate(device, dtype=torch.bfloat16)}
    rows = ["| resolution (widths) | mode | batch | images/s | s / iteration | peak GiB | vs eager |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    flop_rows = []
    for res in resolutions:
        base: dict[int, float] = {}
        flops_per_image = None
        for batch in batches:
            for mode in modes:
                cmd = [sys.executable, __file__, "_train_case", "--res", str(res), "--mode", mode, "--iters",
                       str(iters), "--warmup", str(warmup), "--batch-size", str(batch)]
                if profile_dir:
                    cmd += ["--profile", str(Path(profile_dir) / f"profile_{res}_{mode}_{batch}.txt")]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    err = [x for x in r.stderr.strip().splitlines() if "Error" in x] or r.stderr.strip().splitlines()
                    rows.append(f"| {res} ({TRAIN_WIDTHS[res][0]}) | {mode} | {batch} | failed: "
                                f"{(err or ['?'])[-1][:100]} | | | |")
                    print(rows[-1], flush=True)
                    continue
                d = json.loads(r.stdout.strip().splitlines()[-1])
                if mode == "eager":
                    base[batch] = d["images_s"]
                if d["flops"]:
                    flops_per_image = d["flops"] / batch
                if flops_per_image:
                    ref = "bf16" if mode.startswith(("bf16", "fp16")) else "fp32"
                    f = flops_per_image * batch
                    flop_rows.append(f"| {res} | {mode} | {batch} | {f / 1e9:.1f} | {d['iter_s']:.4f} | "
                                     f"{f / d['iter_s'] / 1e12:.2f} | {ref} {mm[ref] / 1e12:.1f} | "
                                     f"{100 * f / d['iter_s'] / mm[ref]:.1f}% |")
                rel = f"{d['images_s'] / base[batch]:.2f}x" if batch in base else "-"
                peak = f"{d['peak_gib']:.1f}" if d.get("peak_gib") is not None else "-"
                rows.append(f"| {res} ({TRAIN_WIDTHS[res][0]}) | {mode} | {batch} | {d['images_s']:,.1f} | "
                            f"{d['iter_s']:.4f} | {peak} | {rel} |")
                print(rows[-1], flush=True)
    rows += ["", f"FLOPs of one iteration (counted by torch.utils.flop_counter in float32, the same count in every "
             f"precision) over its measured time, against a large torch.mm on {device.type} in the matching "
             f"precision (float32 without TF32 for eager/channels_last/compile, bfloat16 for bf16/fp16 modes, "
             f"TF32 modes against float32):", "",
             "| resolution | mode | batch | GFLOP / iteration | s / iteration | achieved TFLOP/s | torch.mm TFLOP/s | "
             "fraction |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |", *flop_rows]
    return rows


# ------------------------------------------------------------------------------------------------------ loader
def _loader_rate(dataset: str, root: str, res: int, workers: int, batches: int, in_memory: bool = False) -> float:
    from sagan.data import SAGANData

    dm = SAGANData(dataset, root=root, resolution=res, batch_size=64, num_workers=workers, in_memory=in_memory,
                   seed=0)
    dm.setup("fit")
    loader = dm.train_dataloader()

    def forever():  # epochs back to back (persistent workers, as in training)
        while True:
            yield from loader

    it = forever()
    for _ in range(max(2, workers * 2)):  # worker start-up and the first prefetches
        next(it)
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        x, _ = next(it)
        n += x.shape[0]
    rate = n / (time.perf_counter() - t)
    del it
    loader = dm = None  # noqa: F841 - drops the last references (the generator's cell)
    gc.collect()  # shut this loader's workers down here, not in a worker of the next loader that inherited it
    return rate


def bench_loader(root: str, res: int, workers: list[int], batches: int) -> list[str]:
    import json

    from sagan.prepared import prepare

    n_files = sum(1 for p in Path(root).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    rows = [f"{n_files} images under {root}, served at {res}x{res}, batch 64", "",
            "| path | workers | images/s | vs best folder |", "| --- | ---: | ---: | ---: |"]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        prepare(root, Path(tmp) / "prep", resolution=res, workers=max(workers), progress=False)
        prep_s = time.perf_counter() - t
        archive = Path(tmp) / "images.zip"  # the same files in a zip (stored: PNG and JPEG do not deflate)
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
            for f in sorted(Path(root).rglob("*")):
                if f.is_file():
                    z.write(f, f"{Path(root).name}/{f.relative_to(root).as_posix()}")
        from sagan.data import scan_image_folder

        scan_s = {}
        for name, where in (("folder", root), ("zip", str(archive))):
            t = time.perf_counter()
            scan_image_folder(where)
            scan_s[name] = time.perf_counter() - t
        results = []
        for w in workers:  # interleaved: the host's drift falls on both alike
            results.append(("folder", w, _loader_rate("folder", root, res, w, batches)))
            print(results[-1], flush=True)
            results.append(("zip of the folder", w, _loader_rate("folder", str(archive), res, w, batches)))
            print(results[-1], flush=True)
        for mem in (False, True):
            for w in workers:
                results.append((f"prepared{' in memory' if mem else ''}", w,
                                _loader_rate("prepared", str(Path(tmp) / "prep"), res, w, batches * 10, mem)))
                print(results[-1], flush=True)
    results.sort(key=lambda r: (["folder", "zip of the folder"].index(r[0]) if "prepared" not in r[0] else 2,))
    best_folder = max(r for p, _, r in results if p == "folder")
    for path, w, rate in results:
        rows.append(f"| {path} | {w} | {rate:,.0f} | {rate / best_folder:.1f}x |")
    cmd = [sys.executable, __file__, "_train_case", "--res", str(res), "--mode", "eager", "--iters", "3",
           "--warmup", "2", "--batch-size", "64"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    step = json.loads(r.stdout.strip().splitlines()[-1])["images_s"] if r.returncode == 0 else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows += ["", f"`sagan prepare` of the folder: {prep_s:.1f} s ({n_files / prep_s:,.0f} images/s, "
             f"{max(workers)} workers). Scan of the folder {scan_s['folder']:.2f} s, of the zip {scan_s['zip']:.2f} s.",
             f"Training step on {device} ({res}x{res}, configs/celeba64.yaml, batch 64, eager fp32): "
             + (f"{step:,.3g} images/s." if step else f"failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")]
    return rows


def bench_decode(resolutions: list[int], repeats: int) -> list[str]:
    import numpy as np

    from sagan.data import ImageLoader

    try:
        from skimage import data as skdata
    except ImportError:
        sys.exit("benchmark.py decode needs scikit-image for its photographs: pip install scikit-image")

    torch.set_num_threads(1)
    rows = ["| source | resolution | full decode ms | draft decode ms | speed-up | PSNR dB (min over photos) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    photos = ["astronaut", "coffee", "chelsea", "rocket"]

    def ms(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 1000 * sorted(times)[len(times) // 2]

    with tempfile.TemporaryDirectory() as tmp:
        for w, h in [(640, 480), (2048, 1536), (4000, 3000)]:
            paths = []
            for name in photos:
                paths.append(Path(tmp) / f"{name}_{w}.jpg")
                Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((w, h), Image.Resampling.LANCZOS) \
                    .save(paths[-1], quality=92)
            for res in resolutions:
                loader = ImageLoader(res, 3)

                def full(path: Path) -> np.ndarray:
                    with Image.open(path) as img:
                        img.load()
                        return loader.pil(img)

                t_full = sum(ms(lambda: full(q)) for q in paths) / len(paths)
                t_fast = sum(ms(lambda: loader(q)) for q in paths) / len(paths)
                mse = max(float(((loader(q).astype(float) - full(q).astype(float)) ** 2).mean()) for q in paths)
                psnr = f"{10 * np.log10(255 ** 2 / mse):.1f}" if mse > 0 else "identical"
                rows.append(f"| {w}x{h} JPEG | {res} | {t_full:.1f} | {t_fast:.1f} | {t_full / t_fast:.1f}x | "
                            f"{psnr} |")
                print(rows[-1], flush=True)
    return rows


# --------------------------------------------------------------------------------------------------------- ddp
def _ddp_case(devices: int, iters: int, warmup: int, global_batch: int = 64) -> None:
    import json
    import statistics

    import pytorch_lightning as pl
    import yaml

    from sagan.data import SAGANData
    from sagan.module import SAGAN
    from sagan.strategy import GANDDPStrategy

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // devices))  # processes share the cores
    pl.seed_everything(0, verbose=False)
    cfg = yaml.safe_load((REPO / "configs/digits.yaml").read_text())
    dm = SAGANData("digits", resolution=32, batch_size=global_batch // devices)
    model = SAGAN(resolution=32, img_channels=1, num_classes=10, **cfg["model"])
    times: list[float] = []

    class Timer(pl.Callback):
        def on_train_batch_end(self, *a, **k) -> None:
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    strategy = GANDDPStrategy(process_group_backend="nccl" if cuda else "gloo") if devices > 1 else "auto"
    trainer = pl.Trainer(accelerator="gpu" if cuda else "cpu", devices=devices, strategy=strategy,
                         max_steps=2 * (iters + warmup), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Timer()])
    trainer.fit(model, dm)
    if trainer.is_global_zero:
        dts = [b - a for a, b in zip(times[warmup - 1:], times[warmup:])]
        print("RESULT " + json.dumps({"images_s": global_batch / statistics.median(dts),
                                      "threads": torch.get_num_threads()}), flush=True)


def bench_ddp(iters: int, warmup: int = 5) -> list[str]:
    import json

    rows = ["| processes | threads each | global batch | images/s (median step) | vs 1 process |",
            "| ---: | ---: | ---: | ---: | ---: |"]
    base = None
    for devices in (1, 2):
        r = subprocess.run([sys.executable, __file__, "_ddp_case", "--devices", str(devices), "--iters", str(iters),
                            "--warmup", str(warmup)], capture_output=True, text=True)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode != 0 or not line:
            rows.append(f"| {devices} | | 64 | failed: {(r.stderr.strip().splitlines() or ['?'])[-1][:100]} | |")
            continue
        d = json.loads(line[-1][7:])
        base = base or d["images_s"]
        rows.append(f"| {devices} | {d['threads']} | 64 | {d['images_s']:.1f} | {d['images_s'] / base:.2f}x |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", choices=["attention", "train", "ddp", "generate", "logging", "fid", "loader",
                                       "decode", "ema", "reuse", "reference",
                                       "_attn_case", "_reference_case",
                                       "_train_case", "_ddp_case"])
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--res", type=int)
    p.add_argument("--pool", action="store_true")
    p.add_argument("--explicit", action="store_true")
    p.add_argument("--mode", default="eager")
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--modes", nargs="+", default=["eager", "channels_last", "bf16", "compile"])
    p.add_argument("--steps", type=int, default=150, help="iterations per run (logging)")
    p.add_argument("--interval", type=int, default=25, help="log_every_n_steps (logging)")
    p.add_argument("--repeats", type=int, default=None, help="default 5 (200 for ema)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--weights", help="real InceptionV3 weights (default: random weights of the same shapes)")
    p.add_argument("--batch-size", type=int, nargs="+", default=None,
                   help="default 64 (generate), 100 (fid), 16 (train; several: each one, e.g. doubling to find the "
                        "largest that fits)")
    p.add_argument("--profile", help="train: write a torch.profiler summary of each case to this folder "
                                     "(_train_case: to this file)")
    p.add_argument("--root", help="image folder (loader)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts (loader)")
    p.add_argument("--batches", type=int, default=60, help="batches timed per folder case (loader)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.section == "_attn_case":
        import json

        print(json.dumps(_attn_case(a.res, a.pool, a.explicit, a.repeats or 5)))
        return
    if a.section == "_reference_case":
        import json

        print(json.dumps(_reference_case(a.sizes[0], a.mode)))
        return
    if a.section == "_ddp_case":
        _ddp_case(a.devices, a.iters, a.warmup)
        return
    if a.section == "_train_case":
        import json

        print(json.dumps(_train_case(a.res, a.mode, a.iters, a.warmup, (a.batch_size or [16])[0], a.profile)))
        return
    print(header(), flush=True)
    print(f"command: python scripts/benchmark.py {' '.join(sys.argv[1:])}", flush=True)
    if a.section == "attention":
        rows = bench_attention(a.repeats or 5)
    elif a.section == "train":
        rows = bench_train(a.resolutions, a.modes, a.iters, a.warmup, a.batch_size or [16], a.profile)
    elif a.section == "ddp":
        rows = bench_ddp(a.iters)
    elif a.section == "generate":
        rows = bench_generate((a.batch_size or [64])[0], a.repeats or 5)
    elif a.section == "logging":
        rows = bench_logging(a.steps, a.interval)
    elif a.section == "fid":
        rows = bench_fid(a.sizes, a.weights, (a.batch_size or [100])[0])
    elif a.section == "decode":
        rows = bench_decode(a.resolutions, a.repeats or 5)
    elif a.section == "loader":
        if not a.root:
            p.error("loader needs --root FOLDER (e.g. from scripts/make_photo_patches.py --size 64)")
        rows = bench_loader(a.root, a.res or 64, a.workers, a.batches)
    elif a.section == "ema":
        rows = bench_ema(a.repeats or 200)
    elif a.section == "reuse":
        rows = bench_reuse(a.steps, a.repeats or 3)
    elif a.section == "reference":
        rows = bench_reference(a.sizes if a.sizes != [1000, 10000] else [100000, 300000, 1000000])
    print("\n".join(rows))


if __name__ == "__main__":
    main()
