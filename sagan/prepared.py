"""Prepared data sets: an image folder (or a zip of one) or CIFAR-10 decoded, resized and centre-cropped once,
stored as uint8.

    sagan prepare --source data/celeba --out data/celeba64 --resolution 64
    sagan prepare --source img_align_celeba.zip --out data/celeba64 --resolution 64
    sagan prepare --source cifar10 --root data/cifar10 --out data/cifar10-32 --resolution 32
    sagan fit --config configs/celeba64.yaml --data.dataset prepared --data.root data/celeba64

Layout of a prepared set (a folder):

    manifest.json   format and version, count, resolution, channels, class names, the colour transparent
                    pixels were composited onto (background, RGB), the source and its
                    fingerprint, the files skipped as unreadable, the byte size of images.u8
    images.u8       every image as raw uint8, (N, C, R, R) C-order: image i starts at byte i * C * R * R
    labels.npy      (N,) int64 class indices (0 for unlabelled sets)

Why this format: training reads rows of one uint8 array through the page cache (``np.memmap``), a whole batch
per call (``__getitems__``), with no decoding, no per-image files and no per-image Python objects; shuffling
and the split between ranks are only index arithmetic (the sampler of :mod:`sagan.data`), so exact resume and
disjoint DDP shards come for free, every rank opens the same file and reads only its own rows, and nothing scans
the source at start-up. On this 2-core machine it serves far more images per second than the model consumes (see
BENCHMARKS.md). The pixels are exactly those the image-folder path produces (same resize and crop code, no JPEG
re-encoding). For sets larger than local disk, put the folder on a shared or object-store-backed file system
(NFS, Lustre, a FUSE mount of S3/GCS): memmap reads only the pages of the rows a rank uses.

Writes are atomic: the set is built in ``OUT.tmp-<pid>`` and renamed to ``OUT`` when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .errors import ArgumentParser, DataError, SaganError, disk_full_exit
from .files import tmp_path, user_path

FORMAT = "sagan-prepared"
VERSION = 1
MANIFEST = "manifest.json"
IMAGES = "images.u8"
LABELS = "labels.npy"


# ------------------------------------------------------------------------------------------------------ reading
def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a prepared set, checked: one clear error when it is not one, or is damaged."""
    if "://" in str(root):
        raise DataError(f"data.root={str(root)!r} is a URL: prepared sets are read through the file system (a memory "
                        "map). Mount the bucket (mountpoint-s3, s3fs, gcsfuse) or copy the set to local disk, and "
                        "pass that path")
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        hint = " (an unfinished `sagan prepare` leaves OUT.tmp-<pid>; run it again)" if root.parent.is_dir() and \
            any(root.parent.glob(f"{root.name}.tmp-*")) else ""
        raise DataError(f"{str(root)!r} is not a prepared data set: no {MANIFEST}. Create it with "
                        f"`sagan prepare --source SRC --out {root} --resolution R`{hint}")
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"the manifest {str(path)!r} is unreadable ({type(e).__name__}): run `sagan prepare` again") from None
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise DataError(f"{str(root)!r} holds format {m.get('format')!r} version {m.get('version')!r}; this sagan "
                        f"reads {FORMAT!r} version {VERSION}: run `sagan prepare` again")
    expected = m["count"] * m["channels"] * m["resolution"] ** 2
    images = root / IMAGES
    size = images.stat().st_size if images.is_file() else -1
    if size != expected:
        raise DataError(
            f"prepared data set {str(root)!r} is damaged: {IMAGES} has {max(size, 0)} bytes, the manifest promises "
            f"{m['count']} images of {m['channels']}x{m['resolution']}x{m['resolution']} = {expected} bytes "
            "(a truncated copy?). Copy it again or run `sagan prepare` again; nothing was trained on it"
        )
    return m


class PreparedDataset(Dataset):
    """A prepared set as (uint8 image (C, R, R), label) items; ``in_memory`` loads the whole array into RAM,
    otherwise rows are read through a memory map (opened lazily, once per process, so workers share nothing).
    ``__getitems__`` serves a whole batch with one indexed read (the DataLoader uses it)."""

    def __init__(self, root: str | os.PathLike, in_memory: bool = False) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        m = self.manifest
        self.shape = (m["count"], m["channels"], m["resolution"], m["resolution"])
        self.labels = torch.from_numpy(np.load(self.root / LABELS)).long()
        if len(self.labels) != m["count"]:
            raise DataError(f"prepared data set {str(self.root)!r} is damaged: {LABELS} has {len(self.labels)} "
                            f"labels for {m['count']} images; run `sagan prepare` again")
        self.in_memory = in_memory
        self._images: np.ndarray | None = None
        if in_memory:
            self._images = np.fromfile(self.root / IMAGES, dtype=np.uint8).reshape(self.shape)

    def _array(self) -> np.ndarray:
        if self._images is None:
            self._images = np.memmap(self.root / IMAGES, dtype=np.uint8, mode="r", shape=self.shape)
        return self._images

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return torch.from_numpy(np.array(self._array()[i])), int(self.labels[i])

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        idx = np.asarray(indices)
        images = torch.from_numpy(self._array()[idx])  # (B, C, R, R) uint8, one fancy-indexed read
        return [(images, self.labels[idx])]  # one already-stacked batch: collate with `stacked_batch`

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers re-open the memory map themselves
        state = dict(self.__dict__)
        if not self.in_memory:
            state["_images"] = None
        return state


def stacked_batch(items: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """collate_fn for :meth:`PreparedDataset.__getitems__`: the batch is already stacked."""
    if len(items) == 1 and items[0][0].dim() == 4:
        return items[0]
    return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items])


# ------------------------------------------------------------------------------------------------------ writing
_LOADER: Callable[[Any], np.ndarray] | None = None  # set in each worker process by _init_worker


def _init_worker(loader: Callable[[Any], np.ndarray]) -> None:
    global _LOADER
    _LOADER = loader
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent stops the pool


def _load(job: tuple[int, Any]) -> tuple[int, np.ndarray | None, str | None]:
    i, key = job
    try:
        return i, _LOADER(key), None
    except DataError as e:
        return i, None, str(e)


def _map(keys: list[Any], loader: Callable[[Any], np.ndarray], workers: int) -> Iterator[tuple[int, Any, Any]]:
    """(i, uint8 array or None, error or None) for every key, in order."""
    if workers <= 1:
        _init_worker(loader)
        yield from map(_load, enumerate(keys))
        return
    with get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(
            workers, initializer=_init_worker, initargs=(loader,)) as pool:
        yield from pool.imap(_load, enumerate(keys), chunksize=32)


def _check_arguments(source: str, resolution: int, channels: int, root: str | None, split: str,
                     workers: int | None) -> None:
    """One error naming the flag for arguments that would fail deep inside, or be ignored without a word."""
    from .models import check_resolution

    check_resolution(resolution, "--resolution")
    if channels not in (1, 3):
        raise SaganError(f"--channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if workers is not None and workers < 0:
        raise SaganError(f"--workers must be >= 0 (0 or 1: decode in this process), got {workers}")
    if source == "cifar10":
        if not root:
            raise SaganError("--source cifar10 needs --root, the folder that holds cifar-10-batches-py")
        if split not in ("train", "test"):
            raise SaganError(f"--split must be train or test for CIFAR-10, got {split!r}")
        if not (Path(root) / "cifar-10-batches-py").is_dir():
            raise SaganError(f"CIFAR-10 not found under --root {root!r}: put the extracted 'cifar-10-batches-py' "
                             "folder there (sagan prepare does not download; `sagan fit ... --data.download true` does)")
    elif root is not None or split != "train":
        raise SaganError("--root and --split are for --source cifar10; an image folder is read whole from --source "
                         "(one subfolder per class, or flat): drop them")


def prepare(
    source: str,
    out: str | os.PathLike,
    resolution: int,
    channels: int = 3,
    bad_images: str = "stop",
    root: str | None = None,
    split: str = "train",
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    background: str | None = None,
) -> dict[str, Any]:
    """Write the prepared set of ``source`` (an image folder, or ``cifar10`` with its ``root``) to ``out``.

    Images go through the image-folder path's own loader (:meth:`sagan.data.SAGANData.image_loader`: resize on
    the short side, centre crop, uint8), so the pixels equal what that path serves. Unreadable files stop the run
    naming the file (``bad_images='stop'``) or are left out and listed in the manifest (``'skip'``). Transparent
    pixels are composited onto ``background`` (see ``SAGANData``; black by default), recorded in the manifest."""
    from .data import SAGANData, parse_background
    from .progress import progress as progress_bar

    parse_background(background, "--background")
    _check_arguments(source, resolution, channels, root, split, workers)
    out = Path(out)
    if out.exists() and not overwrite:
        raise SaganError(f"{str(out)!r} already exists: choose another --out, or pass --overwrite to replace it")
    if source == "cifar10":
        dm = SAGANData("cifar10", root=root, resolution=resolution, channels=channels, background=background)
        ds = dm.build_dataset(split)
        keys: list[Any] = list(range(len(ds)))
        labels_all = [int(t) for t in ds.targets]  # type: ignore[attr-defined]
        src = {"kind": "cifar10", "root": str(Path(root).resolve()) if root else None, "split": split,
               "fingerprint": dm.fingerprint(split)}
        loader: Callable[[Any], np.ndarray] = lambda i: ds[i][0].numpy()  # noqa: E731 - rows already in memory
        n_workers = 1
    else:
        dm = SAGANData("folder", root=source, resolution=resolution, channels=channels, background=background)
        keys = [p for p, _ in dm._samples]
        labels_all = [label for _, label in dm._samples]
        src = {"kind": "folder", "path": str(Path(source).resolve()), "fingerprint": dm.fingerprint("train")}
        loader = dm.image_loader()
        n_workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    tmp = tmp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        labels: list[int] = []
        skipped: list[str] = []
        with open(tmp / IMAGES, "wb") as f, progress_bar(len(keys), f"preparing {resolution}x{resolution}",
                                                         "img", disable=not progress) as bar:
            for i, arr, err in _map(keys, loader, n_workers):
                if err is not None:
                    if bad_images == "stop":
                        raise DataError(err.replace("set data.bad_images: skip", "pass --bad-images skip")
                                        + " (nothing was written)")
                    skipped.append(str(keys[i]))
                else:
                    f.write(np.ascontiguousarray(arr, dtype=np.uint8).tobytes())  # (C, R, R) row i
                    labels.append(labels_all[i])
                bar.update(1)
            f.flush()
            os.fsync(f.fileno())
        if not labels:
            raise DataError(f"no image of {source!r} could be read ({len(skipped)} unreadable files)")
        np.save(tmp / LABELS, np.asarray(labels, dtype=np.int64))
        count = len(labels)
        manifest = {
            "format": FORMAT, "version": VERSION, "count": count, "resolution": resolution, "channels": channels,
            "classes": dm.classes, "background": list(dm.background), "layout": "uint8 (N, C, R, R)",
            "images_bytes": count * channels * resolution ** 2,
            "source": src | {"images": len(keys)}, "skipped": skipped,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        manifest["fingerprint"] = hashlib.sha256(json.dumps(
            {k: manifest[k] for k in ("count", "resolution", "channels", "classes", "source")}, sort_keys=True
        ).encode()).hexdigest()[:16]
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# ------------------------------------------------------------------------------------------------------ command
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="sagan prepare", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=user_path, required=True,
                   help="an image folder (flat or one subfolder per class) or a .zip of one, or 'cifar10'")
    p.add_argument("--root", type=user_path, help="CIFAR-10's root folder (with --source cifar10)")
    p.add_argument("--split", default="train", help="CIFAR-10 split: train or test (default train)")
    p.add_argument("--out", type=user_path, required=True, help="folder to create")
    p.add_argument("--resolution", type=int, required=True, help="32, 64 or 128")
    p.add_argument("--channels", type=int, default=3, help="1 (grayscale) or 3 (default)")
    p.add_argument("--bad-images", choices=("stop", "skip"), default="stop",
                   help="unreadable files: stop naming the file (default), or skip and list them in the manifest")
    p.add_argument("--background", help="colour under transparent pixels: a name ('white'), '#rrggbb' or "
                   "'rgb(r, g, b)' (default black); training on the set uses it")
    p.add_argument("--workers", type=int, help="decoding processes (default: the CPU count, at most 8)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        t = time.perf_counter()
        m = prepare(a.source, a.out, a.resolution, a.channels, a.bad_images, a.root, a.split, a.workers, a.overwrite,
                    background=a.background)
    except SaganError as e:
        print(f"sagan prepare: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        return disk_full_exit("sagan prepare", e, a.out, "free space or choose another --out")
    dt = time.perf_counter() - t
    labels = f"{len(m['classes'])} classes" if m["classes"] else "unlabelled"
    print(f"sagan prepare: {m['count']} images ({m['channels']}x{m['resolution']}x{m['resolution']}, "
          f"{labels}) in {a.out} ({dt:.1f} s, {m['count'] / max(dt, 1e-9):.0f} images/s)"
          + (f"; skipped {len(m['skipped'])} unreadable files (listed in {MANIFEST})" if m["skipped"] else ""))
    print(f"  train on it: sagan fit --config CONFIG --data.dataset prepared --data.root {a.out}")
    return 0
