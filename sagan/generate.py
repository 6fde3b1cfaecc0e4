"""``sagan generate``: images, grids, interpolations and attention maps from a checkpoint of ``sagan fit``.

    sagan generate --ckpt outputs/digits/checkpoints/last.ckpt --outdir out --seeds 0-99
    sagan generate --ckpt ... --outdir out --per-class --num 10 --grid          # out/<class name>/<seed>.png + grid
    sagan generate --ckpt ... --outdir out --seeds 0-7 --truncation 1.0 --class-label 3     # a label or a name
    sagan generate --ckpt ... --outdir out --interpolate 1 2 --steps 9 [--interpolate-classes 3 8]
    sagan generate --ckpt ... --outdir out --seeds 0-3 --attention-maps

Sample i depends only on seed i (its own random generator for the latent and for the label), never on the batch
size or the device order. EMA weights by default (``--no-ema`` for the raw generator). Checkpoints are loaded with
``weights_only=True``: nothing but tensors and plain containers is ever unpickled.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from .errors import ArgumentParser, SaganError, disk_full_exit, lower_batch, out_of_memory_advice
from .files import user_path
from .models import Generator
from .progress import track
from .sampling import (class_names, generator_from_checkpoint, labels_for_seeds, latent_for_seed, latents_for_seeds,
                       load_checkpoint, parse_class, parse_seeds, resolve_device, slerp)
from .visualize import attention_figure, check_query_points, default_query_points


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="sagan generate", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=user_path, required=True, help="checkpoint written by 'sagan fit'")
    p.add_argument("--outdir", type=user_path, required=True, help="output folder")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--seeds", help="seeds, e.g. 0-99 or 1,5,9 (default 0-63)")
    which.add_argument("--num", "--num-samples", dest="num", type=int,
                       help="N images: seeds 0..N-1 (--num-samples as in sagan evaluate)")
    p.add_argument("--class-label", "--class", dest="class_label",
                   help="class of every image (conditional models): its name (an image folder's class subfolder) or label")
    p.add_argument("--per-class", action="store_true",
                   help="every seed for every class: OUTDIR/<class name>/<seed>.png")
    p.add_argument("--grid", action="store_true", help="also write OUTDIR/grid.png (rows = classes when per class)")
    p.add_argument("--no-images", action="store_true", help="write only the grid / strip / maps, no single images")
    p.add_argument("--truncation", type=float, help="truncation trick: redraw latent entries with |z| > T")
    p.add_argument("--interpolate", nargs=2, type=int, metavar=("SEED_A", "SEED_B"), help="latent interpolation strip")
    p.add_argument("--interpolate-classes", nargs=2, metavar=("CLASS_A", "CLASS_B"),
                   help="also interpolate the class (conditional models), jointly with the latent")
    p.add_argument("--steps", type=int, default=8, help="images in the interpolation strip (default 8)")
    p.add_argument("--attention-maps", action="store_true", help="draw attention maps for the seeds (first 8)")
    p.add_argument("--query-points", type=int, default=4, help="query positions per attention map (default 4)")
    p.add_argument("--no-ema", action="store_true", help="use the raw generator instead of the EMA one")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--batch-size", type=int, default=64)
    return p


@torch.no_grad()
def generate_images(g: Generator, seeds: list[int], labels: torch.Tensor | None, truncation: float | None,
                    batch_size: int, device: torch.device, progress: bool = True) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] on the CPU for the seeds (and labels), ``batch_size`` seeds at a time.

    Convolution kernels may sum in another order for another batch size, which moves outputs by ~1e-7 and, once
    in a while, flips a pixel's uint8 rounding. On the CPU each image therefore gets its own forward pass: the
    same seed gives the same PNG, bit for bit, whatever the batch size (and one image per pass is also the
    fastest there, see BENCHMARKS.md). On a GPU ``batch_size`` images share a pass and agree to float rounding.
    """
    return torch.cat(list(iter_images(g, seeds, labels, truncation, batch_size, device, progress)))


@torch.no_grad()
def iter_images(g: Generator, seeds: list[int], labels: torch.Tensor | None, truncation: float | None,
                batch_size: int, device: torch.device, progress: bool = True) -> Iterator[torch.Tensor]:
    """:func:`generate_images` one batch of seeds at a time (images of ``seeds[i * batch_size:]`` in order), so
    that writing 50,000 samples holds one batch in memory, not 50,000 images (9.8 GB of float32 at 128x128)."""
    per_pass = 1 if device.type == "cpu" else batch_size
    for s in track(range(0, len(seeds), batch_size), disable=not progress or len(seeds) <= batch_size,
                   desc="generating", unit="batch"):
        z = latents_for_seeds(seeds[s:s + batch_size], g.z_dim, truncation).to(device)
        y = labels[s:s + batch_size].to(device) if labels is not None else None
        yield torch.cat([g(z[i:i + per_pass], y[i:i + per_pass] if y is not None else None).float().cpu()
                         for i in range(0, len(z), per_pass)])


def _save(img: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((img + 1) / 2, path)


def run(a: argparse.Namespace) -> str:
    if a.batch_size < 1:
        raise SaganError(f"--batch-size must be >= 1, got {a.batch_size}")
    if a.interpolate_classes and not a.interpolate:
        ca, cb = a.interpolate_classes
        raise SaganError(f"--interpolate-classes changes the strip of --interpolate SEED_A SEED_B, which is missing: "
                         f"add it (the same seed twice, e.g. --interpolate 0 0 --interpolate-classes {ca} {cb}, "
                         "keeps the latent fixed and moves only the class)")
    if a.attention_maps:
        check_query_points(a.query_points, "--query-points")
    if a.per_class and a.class_label is not None:
        raise SaganError("--per-class draws every class and --class-label one: choose one of them")
    if a.no_images and not (a.grid or a.interpolate or a.attention_maps):
        raise SaganError("--no-images leaves nothing to write: add --grid, --interpolate SEED_A SEED_B or "
                         "--attention-maps, or drop --no-images")
    try:
        seeds = parse_seeds(a.seeds) if a.seeds else list(range(a.num if a.num is not None else 64))
    except ValueError as e:
        raise SaganError(str(e)) from None
    if not seeds:
        raise SaganError("no seeds: give --seeds or a positive --num")
    device = resolve_device(a.device)
    ckpt = load_checkpoint(a.ckpt)
    g = generator_from_checkpoint(ckpt, ema=not a.no_ema, device=device)
    k = g.num_classes
    for flag, val in (("--class-label", a.class_label), ("--interpolate-classes", a.interpolate_classes)):
        if val is not None and k == 0:
            raise SaganError(f"{flag} needs a class-conditional model; this one is unconditional")
    names = class_names(ckpt, k)
    try:
        a.class_label = parse_class(a.class_label, names) if a.class_label is not None else None
        a.interpolate_classes = ([parse_class(c, names) for c in a.interpolate_classes] if a.interpolate_classes
                                 else None)
    except ValueError as e:
        raise SaganError(str(e)) from None
    if a.per_class and k == 0:
        raise SaganError("--per-class needs a class-conditional model; this one is unconditional")
    if a.truncation is not None and a.truncation <= 0:
        raise SaganError(f"--truncation must be positive, got {a.truncation}")
    out = Path(a.outdir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SaganError(f"cannot create output folder {str(out)!r}: {e.strerror}") from None
    written: list[str] = []
    n_images = 0

    if a.interpolate:
        written.append(str(interpolation_strip(g, a, out, device)))
    if a.attention_maps:
        written += [str(p) for p in attention_maps(g, seeds[:8], a, out, device)]
    if not (a.interpolate or a.attention_maps) or a.grid or a.seeds or a.num is not None or a.per_class:
        kept = []  # the grid's images; the others are written and dropped batch by batch
        if a.per_class:
            for c in track(list(range(k)), desc="classes", unit="class", disable=len(seeds) * k < 256):
                done = 0
                for imgs in iter_images(g, seeds, torch.full((len(seeds),), c, dtype=torch.long), a.truncation,
                                        a.batch_size, device, progress=False):
                    if not a.no_images:
                        for s, img in zip(seeds[done:done + len(imgs)], imgs):
                            _save(img, out / names[c] / f"{s:06d}.png")
                    done += len(imgs)
                    n_images += len(imgs)
                    kept += [imgs] if a.grid else []
            nrow = len(seeds)
        else:
            labels = None
            if k > 0:
                labels = (torch.full((len(seeds),), a.class_label, dtype=torch.long) if a.class_label is not None
                          else labels_for_seeds(seeds, k))
            for imgs in iter_images(g, seeds, labels, a.truncation, a.batch_size, device):
                if not a.no_images:
                    for s, img in zip(seeds[n_images:n_images + len(imgs)], imgs):
                        _save(img, out / f"{s:06d}.png")
                n_images += len(imgs)
                kept += [imgs] if a.grid else []
            nrow = max(1, math.ceil(math.sqrt(n_images)))
        if a.grid:
            grid = out / "grid.png"
            save_image(make_grid((torch.cat(kept) + 1) / 2, nrow=nrow, padding=2), grid)
            written.append(str(grid))
    where = f"{n_images} images in {out}" if n_images and not a.no_images else f"output in {out}"
    return f"sagan generate: {where}" + (f"; also {', '.join(written)}" if written else "")


@torch.no_grad()
def interpolation_strip(g: Generator, a: argparse.Namespace, out: Path, device: torch.device) -> Path:
    """One row of ``--steps`` images from seed A to seed B (and class A to class B when asked)."""
    if a.steps < 2:
        raise SaganError(f"--steps must be >= 2, got {a.steps}")
    sa, sb = a.interpolate
    za, zb = latent_for_seed(sa, g.z_dim, a.truncation), latent_for_seed(sb, g.z_dim, a.truncation)
    ts = [i / (a.steps - 1) for i in range(a.steps)]
    z = torch.stack([slerp(za, zb, t) for t in ts]).to(device)
    y = None
    if g.num_classes > 0:
        if a.interpolate_classes:
            ca, cb = a.interpolate_classes
        else:
            ca = cb = a.class_label if a.class_label is not None else int(labels_for_seeds([sa], g.num_classes)[0])
        eye = torch.eye(g.num_classes)
        y = torch.stack([(1 - t) * eye[ca] + t * eye[cb] for t in ts]).to(device)  # (steps, K) class weights
    imgs = g(z, y).float().cpu()
    path = out / f"interp_{sa:06d}_{sb:06d}.png"
    save_image(make_grid((imgs + 1) / 2, nrow=a.steps, padding=2), path)
    return path


@torch.no_grad()
def attention_maps(g: Generator, seeds: list[int], a: argparse.Namespace, out: Path, device: torch.device) -> list[Path]:
    """Per seed: OUTDIR/attention/seed_XXXXXX.png, rows = attention layers, panels = query points."""
    if len(g.attn) == 0:
        raise SaganError("this generator has no attention layers (g_attn was empty): nothing to draw")
    k = g.num_classes
    labels = None
    if k > 0:
        labels = (torch.full((len(seeds),), a.class_label, dtype=torch.long) if a.class_label is not None
                  else labels_for_seeds(seeds, k)).to(device)
    z = latents_for_seeds(seeds, g.z_dim, a.truncation).to(device)
    imgs, maps = g(z, labels, return_attention=True)
    points = default_query_points(a.query_points)
    paths = []
    for i, s in enumerate(seeds):
        fig = attention_figure(imgs[i].cpu(), {r: m[i].cpu() for r, m in maps.items()}, points)
        path = out / "attention" / f"seed_{s:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.save(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        with out_of_memory_advice("in generating images", lower_batch("--batch-size", a.batch_size)):
            summary = run(a)
    except SaganError as e:
        print(f"sagan generate: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        return disk_full_exit("sagan generate", e, f"a file in {a.outdir}",
                              "the images written before it are kept; free space or choose another --outdir")
    print(summary)
    return 0
