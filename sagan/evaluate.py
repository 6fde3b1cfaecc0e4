"""``sagan evaluate``: FID / IS / KID of a checkpoint's generator, or of one image folder against another.

    sagan evaluate --ckpt outputs/digits/checkpoints/last.ckpt --num-samples 1000 --metrics fid,kid,isc --floor
    sagan evaluate --ckpt outputs/cifar10/checkpoints/best.ckpt --num-samples 50000 --metrics fid,isc
    sagan evaluate --folders generated/ real/ --metrics fid,kid
    torchrun --nproc_per_node 8 -m sagan.cli evaluate --ckpt best.ckpt --num-samples 50000   # 8 GPUs share the work

The reference set is the checkpoint's own training data (its data settings are stored in the checkpoint; a
``--config`` YAML's ``data:`` section overrides them), without augmentation, at the model's resolution. Reference
statistics are cached. Metrics: FID, precision/recall (default), IS, KID, and always the per-class spread of the
samples relative to the real images and NDB/JSD over k-means bins of the real features, which see whole kinds of
image missing without labels (see :mod:`sagan.metrics`). Under torchrun every process generates and
extracts its share of the samples; the numbers equal a single process's. The table is printed and written as JSON next to the checkpoint (``last.metrics.json``)
together with the protocol: image counts, reference split, feature extractor and the hash of its weights, seed.
``--folders`` reads both folders as training reads an image folder, at one resolution (``--resolution``, default
the first folder's first image's short side).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import (ArgumentParser, DataError, SaganError, disk_full_exit, lower_batch,
                     out_of_memory_advice, write_failure_reason)
from .files import atomic_file, user_path
from .metrics import (INCEPTION, MetricsError, UInt8Images, compute_metrics, parse_metrics,
                      resolve_feature_extractor)

MATCHED_DRAWS = 5  # draws of generated sets as large as the held-out floor (evaluate --floor)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="sagan evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", type=user_path, help="checkpoint written by 'sagan fit'")
    src.add_argument("--folders", nargs=2, type=user_path, metavar=("FIRST", "SECOND"),
                     help="compare two image folders (or zips of them)")
    p.add_argument("--config", type=user_path, help="YAML whose data: section replaces the checkpoint's data settings")
    p.add_argument("--data-root", type=user_path, help="override data.root (e.g. the data set lives elsewhere on this machine)")
    p.add_argument("--num-samples", type=int, default=10000, help="generated images (default 10000)")
    p.add_argument("--resolution", type=int, default=None,
                   help="with --folders: the size both folders' images are resized and centre-cropped to "
                        "(default: the short side of the first folder's first image)")
    p.add_argument("--metrics", default="fid,prc",
                   help="comma-separated subset of fid,isc,kid,prc (default fid,prc: FID, precision and recall)")
    p.add_argument("--feature-extractor", default="auto",
                   help=f"'auto' (digits-mlp for the digits set, else {INCEPTION}) or a torch-fidelity name")
    p.add_argument("--weights", type=user_path, help="feature-extractor weights file (else $SAGAN_INCEPTION_WEIGHTS, hub cache, download)")
    p.add_argument("--fid-layer", help="feature layer for FID/KID (default: the extractor's, 2048 for Inception)")
    p.add_argument("--ref-split", default="train", help="reference split of the training data (default train)")
    p.add_argument("--floor", action="store_true",
                   help="also score the held-out real split against the reference: the best a model can do "
                        "(a set without one, an image folder: two random halves, one the floor, one the reference)")
    p.add_argument("--allow-few-samples", action="store_true",
                   help="compute FID/KID even on fewer images than feature dimensions (biased; noted in the protocol)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-ema", action="store_true", help="evaluate the raw generator instead of the EMA one")
    p.add_argument("--cache-root", type=user_path, help="folder of cached reference statistics (default torch-fidelity's)")
    p.add_argument("--num-workers", type=int, default=0, help="loader workers for the reference images")
    p.add_argument("--json", type=user_path, help="where to write the JSON (default: next to the checkpoint)")
    return p


def _datamodule(ckpt: dict[str, Any], config: str | None, data_root: str | None):
    from .data import SAGANData

    import inspect

    accepted = set(inspect.signature(SAGANData.__init__).parameters) - {"self"}
    hp = {k: v for k, v in (ckpt.get("datamodule_hyper_parameters") or {}).items() if k in accepted}
    if config:
        path = Path(config)
        if not path.is_file():
            raise SaganError(f"config {config!r} does not exist")
        data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
        hp.update(data.get("init_args", data))
    if data_root:
        hp["root"] = data_root
    if not hp:
        raise SaganError("the checkpoint stores no data settings: pass --config with a data: section")
    root = hp.get("root")
    if root and hp.get("dataset") != "digits" and not Path(user_path(root)).exists():  # the reference images are not here
        raise SaganError(
            f"--data-root {root!r} does not exist" if data_root else
            f"the training data of this checkpoint, data.root {root!r}, is not on this machine: pass --data-root "
            "with where it is here (the reference statistics are computed from it)")
    try:
        return SAGANData(**hp)
    except TypeError as e:
        raise SaganError(f"bad data settings {sorted(hp)}: {e}") from None


def _table(rows: dict[str, dict[str, float]]) -> str:
    cols = list(rows)
    names = list(dict.fromkeys(k for r in rows.values() for k in r))
    width = max(14, *(len(c) + 2 for c in cols))
    lines = ["metric".ljust(12) + "".join(c.rjust(width) for c in cols)]
    for n in names:
        lines.append(n.ljust(12) + "".join(
            (f"{rows[c][n]:.4f}" if n in rows[c] else "-").rjust(width) for c in cols))
    return "\n".join(lines)


def evaluate_checkpoint(a: argparse.Namespace) -> dict[str, Any]:
    from .features import DIGITS_FEATURE_EXTRACTOR
    from .diversity import least_varied, spread_by_class
    from .metrics import Evaluator, dist_info
    from .sampling import class_names, generator_from_checkpoint, load_checkpoint

    if a.num_samples < 1:
        raise MetricsError(f"--num-samples must be a positive integer, got {a.num_samples}")
    ckpt = load_checkpoint(a.ckpt)
    dm = _datamodule(ckpt, a.config, a.data_root)
    held_out = [s for s in dm.splits if s != a.ref_split]
    device = _device(a.device)
    g = generator_from_checkpoint(ckpt, ema=not a.no_ema, device=device)
    if (g.resolution, g.img_channels) != (dm.resolution, dm.channels):
        raise SaganError(
            f"the checkpoint's generator makes {g.img_channels}x{g.resolution}x{g.resolution} images but the data "
            f"settings give {dm.channels}x{dm.resolution}x{dm.resolution}: fix --config / the data section"
        )
    fe = a.feature_extractor
    if fe == "auto":
        fe = DIGITS_FEATURE_EXTRACTOR if dm.dataset == "digits" else INCEPTION
    spec = resolve_feature_extractor(fe, a.weights)
    rank, world = dist_info()
    ev = Evaluator(spec, a.metrics, a.fid_layer, device=device, batch_size=a.batch_size,
                   allow_few_samples=a.allow_few_samples, progress=True)
    reference = dm.build_dataset(a.ref_split)
    cache_name = dm.reference_cache_name(a.ref_split, spec.weights_sha256)
    halves = a.floor and not held_out
    ref_name = f"{a.ref_split}, a random half (seed {a.seed})" if halves else a.ref_split
    floor_name = f"the other half of {a.ref_split}" if halves else held_out[0] if held_out else None
    real = None
    if halves:  # no held-out split (an image folder): one half of the images is the floor, the other the reference
        real, reference = _split_halves(reference, dm.labels(a.ref_split), a.seed)
        cache_name += f"-half{a.seed}"
    elif a.floor:
        real = dm.build_dataset(held_out[0])
    # too few images for the metrics: refused now, before the reference is read and the samples drawn
    ev.check_counts({"generated": a.num_samples, f"reference ({ref_name})": len(reference),
                     f"floor ({floor_name})": None if real is None else len(real)})
    ev.load_reference(reference, num_classes=dm.num_classes, cache_name=cache_name, cache_root=a.cache_root,
                      num_workers=a.num_workers)
    label = "generated (EMA)" if not a.no_ema else "generated (raw G)"
    res = ev.generator(g, a.num_samples, seed=a.seed)
    rows = {label: res.values}
    protocol = dict(res.protocol)
    protocol.update(
        checkpoint=str(Path(a.ckpt).resolve()),
        iteration=(ckpt.get("sagan") or {}).get("g_steps"),
        ema=not a.no_ema,
        num_generated=a.num_samples,
        num_reference=ev.reference.count,
        reference={"dataset": dm.dataset, "root": dm.root, "split": ref_name, "resolution": dm.resolution,
                   "channels": dm.channels, "fingerprint": dm.fingerprint(a.ref_split)},
    )
    out: dict[str, Any] = {"metrics": res.values, "protocol": protocol}
    per_class = spread_by_class(res.spread_per_class, dm.classes if len(dm.classes) == g.num_classes
                                 else class_names(ckpt, g.num_classes))
    if per_class:
        out["spread_per_class"] = per_class
    if a.floor:
        floor = ev.images(real, num_classes=dm.num_classes, seed=a.seed, num_workers=a.num_workers)
        rows[f"real {'half' if halves else held_out[0]} (floor)"] = floor.values
        out["floor"] = {"metrics": floor.values, "split": floor_name, "num_images": len(real)}
        if len(real) < a.num_samples:
            matched = _matched_draws(ev, g, len(real), a.seed)
            rows[f"generated, {len(real)} (x{MATCHED_DRAWS})"] = matched
            out["floor"]["generated_same_count"] = {"metrics": matched, "num_generated": len(real),
                                                    "draws": MATCHED_DRAWS}
    if rank == 0:
        print(_table(rows))
        print(f"protocol: {a.num_samples} generated vs {ev.reference.count} reference images ({dm.dataset}/{ref_name}, "
              f"{dm.resolution}px), features {spec.name} (weights sha256 {spec.weights_sha256}), seed {a.seed}"
              + (f", {world} processes" if world > 1 else ""))
        if "fid" in res.values and a.floor:
            print(f"FID = {res.values['fid'] / max(floor.values['fid'], 1e-12):.2f} x the floor"
                  + (f"; recall {res.values['recall']:.3f} vs {floor.values['recall']:.3f} for real images"
                     if "recall" in res.values else ""))
            if "generated_same_count" in out["floor"]:
                m, n = out["floor"]["generated_same_count"]["metrics"], len(real)
                print(f"at the floor's sample count ({n} generated, mean of {MATCHED_DRAWS} draws): FID = "
                      f"{m['fid'] / max(floor.values['fid'], 1e-12):.2f} x the floor"
                      + (f"; recall {m['recall']:.3f} vs {floor.values['recall']:.3f}" if "recall" in m else ""))
        if per_class:
            print(f"least varied classes (spread, generated over real): {least_varied(per_class)}")
    json_path = Path(a.json) if a.json else Path(a.ckpt).with_suffix(".metrics.json")
    return out | {"_json": json_path if rank == 0 else None}


def _split_halves(dataset: Any, labels: torch.Tensor, seed: int) -> tuple[Any, Any]:
    """Two disjoint random halves of ``dataset`` (seeded), for a floor on a set without a held-out split: the real
    images of one half are scored against the other as the generator is, so the floor and the model share one
    reference and neither is scored against images it contains. Each class (``labels``, one per item) is split in
    half."""
    from torch.utils.data import Subset

    g = torch.Generator().manual_seed(seed)
    first, second = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)].tolist()
        first += idx[: len(idx) // 2]
        second += idx[len(idx) // 2:]
    return Subset(dataset, sorted(first)), Subset(dataset, sorted(second))


def _matched_draws(ev: Any, g: torch.nn.Module, n: int, seed: int) -> dict[str, float]:
    """The generator scored on as many samples as the held-out floor has, averaged over ``MATCHED_DRAWS`` draws
    (seeds ``seed``, ``seed + 1``, ...). Both figures depend on
    the sample count, in opposite directions: FID is biased upwards on small sets, and k-NN recall's balls (the
    distance to the 3rd neighbour among the generated samples) are wider on small sets. A 1,000-sample model
    against a 360-image floor thus reads a flattering FID ratio and a harsh recall ratio; this row compares like
    with like (Kynkaanniemi et al. 2019 compare sets of equal size)."""
    draws = [ev.generator(g, n, seed=seed + i).values for i in range(MATCHED_DRAWS)]
    return {k: sum(d[k] for d in draws) / len(draws) for k in draws[0]}


def _device(name: str | None) -> torch.device:
    """--device, or under torchrun the GPU of this process's local rank, else the current default."""
    if name:
        from .sampling import resolve_device

        return resolve_device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _init_distributed() -> bool:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPUs."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def evaluate_folders(a: argparse.Namespace) -> dict[str, Any]:
    """Both folders read by the image-folder path of training (every format it reads, at any depth, EXIF
    orientation, 16-bit and transparent images, tool folders such as ``__MACOSX`` skipped), each image resized on
    its short side and centre-cropped to one resolution: ``--resolution``, else the first folder's first image's
    short side (generated images first: the real ones are then compared at the generator's resolution, as
    ``--ckpt`` compares them). Folders of mixed sizes work; an unreadable file is named."""
    from .data import ImageFolderDataset, ImageLoader, list_images

    first, second = a.folders
    # a mistyped folder is named before the feature extractor's weights are looked for
    files = {folder: list_images(folder) for folder in (first, second)}
    if a.resolution is not None and a.resolution < 1:
        raise SaganError(f"--resolution must be >= 1, got {a.resolution}")
    resolution = a.resolution if a.resolution is not None else _short_side(files[first][0])
    loader = ImageLoader(resolution, channels=3)
    inputs = [UInt8Images(ImageFolderDataset([(f, 0) for f in files[folder]], loader)) for folder in (first, second)]
    fe = INCEPTION if a.feature_extractor == "auto" else a.feature_extractor
    spec = resolve_feature_extractor(fe, a.weights)
    try:
        res = compute_metrics(*inputs, metrics=a.metrics, feature_extractor=spec, fid_layer=a.fid_layer,
                              seed=a.seed, batch_size=a.batch_size, device=_device(a.device),
                              allow_few_samples=a.allow_few_samples)
    except DataError as e:  # an unreadable file: training's advice (data.bad_images) does not apply here
        raise DataError(str(e).replace(", or set data.bad_images: skip", "")) from None
    print(_table({f"{first} vs {second}": res.values}))
    print(f"protocol: {len(inputs[0])} vs {len(inputs[1])} images, both at {resolution}x{resolution} (resized on the "
          f"short side, centre-cropped), features {spec.name}, seed {a.seed}")
    protocol = dict(res.protocol) | {"first": str(Path(first).resolve()), "second": str(Path(second).resolve()),
                                     "resolution": resolution}
    return {"metrics": res.values, "protocol": protocol, "_json": Path(a.json) if a.json else None}


def _short_side(path: Any) -> int:
    from PIL import ImageOps, UnidentifiedImageError

    from .data import open_image

    try:
        with open_image(path) as img:
            return min(ImageOps.exif_transpose(img).size)
    except (OSError, UnidentifiedImageError) as e:
        raise SaganError(f"cannot read image {str(path)!r} ({e}): remove or replace it, or pass --resolution") from None


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    started = False
    try:
        parse_metrics(a.metrics)
        if a.batch_size < 1:
            raise MetricsError(f"--batch-size must be >= 1, got {a.batch_size}")
        if a.num_workers < 0:
            raise MetricsError(f"--num-workers must be >= 0 (0 = load in this process), got {a.num_workers}")
        if a.ckpt and a.resolution is not None:
            raise MetricsError("--resolution is for --folders: a checkpoint's samples and its data set are compared "
                               "at the model's resolution")
        if a.ckpt:
            started = _init_distributed()
        with out_of_memory_advice("in generating or scoring images", lower_batch("--batch-size", a.batch_size)):
            out = evaluate_checkpoint(a) if a.ckpt else evaluate_folders(a)
    except SaganError as e:
        print(f"sagan evaluate: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        return disk_full_exit("sagan evaluate", e, "a file", "free space and evaluate again")
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    json_path = out.pop("_json")
    if json_path is not None:
        return _write_json(out, json_path, asked=bool(a.json))
    return 0


def _write_json(out: dict, path: Path, asked: bool) -> int:
    """Write the result atomically (no truncated file on a full disk). Where the default place beside the
    checkpoint cannot be written (a read-only or shared run folder, a full disk), the printed table is the result
    and the exit status stays 0; a ``--json`` path that cannot be written is an error."""
    try:
        with atomic_file(path) as f:
            f.write((json.dumps(out, indent=2, default=str) + "\n").encode())
    except OSError as e:
        why = write_failure_reason(e, path.parent)
        if asked:
            print(f"sagan evaluate: error: could not write {str(path)!r}: {why}; the numbers above are the result",
                  file=sys.stderr)
            return 2
        print(f"sagan evaluate: could not write {str(path)!r} beside the checkpoint ({why}); the numbers above are "
              "the result: pass --json PATH to keep them in a file", file=sys.stderr)
        return 0
    print(f"wrote {path}")
    return 0
