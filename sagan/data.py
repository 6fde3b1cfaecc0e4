"""Training data: any image folder, CIFAR-10 (torchvision), prepared sets, and the built-in offline *digits* set.

Data sets serve uint8 images (C, R, R) with an integer class label (0 for unlabelled data): workers only decode
and resize (or, for prepared sets, only read rows). On the training device, after the batch is transferred,
:meth:`SAGANData.on_after_batch_transfer` turns them into float in [-1, 1] and applies random horizontal flips
(drawn from the step's random stream, see :func:`sagan.checkpointing.seed_step`), so nothing random happens in
worker processes and a resumed run sees exactly the flips an uninterrupted one would, whatever the worker count.

* ``folder``: a folder of images, flat (unconditional) or one subfolder per class (class-conditional), read with
  PIL, resized on the short side and centre-cropped to ``resolution``; or a ``.zip`` of such a folder, read in place.
* ``cifar10``: ``torchvision.datasets.CIFAR10`` from a local ``root`` (``download: true`` fetches it when online).
* ``prepared``: a folder written once by ``sagan prepare`` (:mod:`sagan.prepared`): the same pixels as the folder
  path, read as rows of one uint8 array; the fast path for large sets and many GPUs.
* ``digits``: scikit-learn's ``load_digits`` (1,797 real 8x8 handwritten digits, 10 classes, shipped inside the
  scikit-learn package, so it works offline), upsampled to ``resolution``; a fixed stratified 80/20 split.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import warnings
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset
from torchvision import transforms

from .errors import ConfigError, DataError, RankWarning, SaganWarning
from .files import user_path
from .models import check_resolution

IMG_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".ppm", ".pgm", ".pbm", ".pnm", ".bmp", ".tif", ".tiff", ".webp",
                  ".gif", ".avif", ".tga", ".qoi")
# files that look like images but that the folder path does not read: a scan warns about them instead of
# silently training without them
UNREAD_IMAGE_EXTENSIONS = (".heic", ".heif", ".jxl", ".svg", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf",
                           ".rw2", ".raw", ".exr", ".hdr")
# part of a folder's fingerprint (cached reference statistics): bump when ImageLoader's pixels change
LOADER_VERSION = 2
BLACK = (0, 0, 0)
DATASETS = ("digits", "cifar10", "folder", "prepared")
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


# ------------------------------------------------------------------------------------------------------ digits
def load_digits_arrays(split: Literal["train", "test", "all"] = "train") -> tuple[Tensor, Tensor]:
    """scikit-learn's real digits as ((N, 8, 8) float in [0, 16], (N,) long labels) for a fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images, labels = torch.from_numpy(d.images).float(), torch.from_numpy(d.target).long()
    if split == "all":
        return images, labels
    idx_train, idx_test = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=DIGITS_TEST_FRACTION,
        stratify=labels.numpy(),
        random_state=DIGITS_SPLIT_SEED,
    )
    idx = torch.from_numpy(idx_train if split == "train" else idx_test)
    return images[idx], labels[idx]


def digits_to_images(images8: Tensor, resolution: int, channels: int = 1) -> Tensor:
    """(N, 8, 8) digit intensities in [0, 16] -> (N, channels, R, R) in [-1, 1], bicubic upsampling."""
    x = images8.unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False).clamp(0.0, 1.0)
    return (x * 2.0 - 1.0).repeat(1, channels, 1, 1)  # (N, C, R, R)


def images_to_digits(images: Tensor) -> Tensor:
    """Inverse view for digit classifiers: (N, C, R, R) in [-1, 1] -> (N, 64) intensities in [0, 16] at 8x8."""
    x = images.float().mean(dim=1, keepdim=True)  # (N, 1, R, R)
    x = F.adaptive_avg_pool2d((x.clamp(-1, 1) + 1.0) / 2.0, 8)  # (N, 1, 8, 8)
    return (x * 16.0).flatten(1)  # (N, 64)


# ------------------------------------------------------------------------------------------------ image folder
def _images_among(files: Iterable[Any], unread: dict[str, int]) -> list[Any]:
    """The readable images among ``files`` (``Path`` or :class:`ZipMember`, never folders), sorted; files that look
    like images but are not read (HEIC, RAW, SVG, ...) are counted into ``unread`` by extension instead (one pass
    over the folder for both)."""
    found = []
    for p in files:
        ext = p.suffix.lower()
        if p.name.startswith("."):
            continue
        if ext in IMG_EXTENSIONS:
            found.append(p)
        elif ext in UNREAD_IMAGE_EXTENSIONS:
            unread[ext] = unread.get(ext, 0) + 1
    # Path order, by parts, with each key made once: Path's own comparison is a Python call per comparison
    return sorted(found, key=lambda p: p.parts if isinstance(p, Path) else (p.archive.parts, p.member))


def _files_in(folder: Path) -> list[Path]:
    """The files directly in ``folder``, from its directory entries: no file is stat'ed (on NFS or Lustre, a
    network round trip each) but symbolic links, which are followed."""
    with os.scandir(folder) as entries:
        return [Path(e.path) for e in entries if e.is_file()]


# Folders that tools put beside or inside image folders and that are never a class or training images: macOS's
# resource forks in zip files (``__MACOSX/._photo.jpg``), Synology's thumbnails (``@eaDir/photo.jpg/THUMB_XL.jpg``),
# and hidden folders (``.thumbnails``, ``.ipynb_checkpoints``, ``.git``).
NOT_IMAGE_FOLDERS = ("__MACOSX", "@eaDir")


def _kept_folder(name: str) -> bool:
    return not name.startswith(".") and name not in NOT_IMAGE_FOLDERS


def _files_below(folder: Path) -> Iterable[Path]:
    """Every file below ``folder`` (from the directory entries alone: nothing is stat'ed), not descending into
    the folders :func:`_kept_folder` leaves out."""
    for here, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if _kept_folder(d)]  # pruned in place: os.walk does not descend into them
        yield from (Path(here) / f for f in files)


def _warn_unread(root: Path, unread: dict[str, int]) -> None:
    """Without this warning a folder of phone photos (HEIC) would train on the few JPEGs among them, silently."""
    if unread:
        kinds = ", ".join(f"{n} {ext}" for ext, n in sorted(unread.items()))
        warnings.warn(f"image folder {str(root)!r}: {kinds} file(s) are not read (the folder path reads "
                      f"{', '.join(IMG_EXTENSIONS)}): convert them, e.g. to PNG or JPEG, to train on them",
                      SaganWarning, stacklevel=3)


@dataclass(frozen=True, order=True)
class ZipMember:
    """An image inside a zip archive (``data.root: faces.zip``): what a path is to an image folder.

    Stored and deflated members (what zip tools write) are read straight from the archive at the offset its
    directory gave the scan, so a DataLoader worker keeps one open file, not the parsed directory of every member
    (for 200,000 members, 1.7 s and about 100 MiB per worker). Each process opens its own file (one inherited
    through ``fork`` would share its offset with the parent's). Other methods go through :mod:`zipfile`."""

    archive: Path
    member: str  # the name inside the archive, '/'-separated
    size: int = field(compare=False)
    crc: int = field(compare=False)
    offset: int = field(compare=False, default=-1)  # of the member's local header
    method: int = field(compare=False, default=-1)  # compression method
    compressed: int = field(compare=False, default=-1)  # bytes stored

    @property
    def name(self) -> str:
        return self.member.rpartition("/")[2]

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    def read(self) -> bytes:
        if self.method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            try:
                return _open_once(self.archive, "zip").read(self.member)
            except (RuntimeError, NotImplementedError) as e:  # encrypted, or a method Python does not read
                raise zipfile.BadZipFile(f"{e}; unpack the archive with a zip tool that reads it") from None
        f = _open_once(self.archive, "file")
        f.seek(self.offset)
        header = f.read(30)  # the local file header: signature ... name length, extra length
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"no local header at byte {self.offset}: the archive changed since it was read")
        names, extra = struct.unpack("<HH", header[26:30])
        f.seek(self.offset + 30 + names + extra)
        data = f.read(self.compressed)
        if self.method == zipfile.ZIP_DEFLATED:
            data = zlib.decompress(data, -15)  # raw deflate, no zlib header
        if len(data) != self.size or zlib.crc32(data) != self.crc:
            raise zipfile.BadZipFile("bad CRC-32 or size: the member is corrupt, or the archive changed")
        return data

    def __str__(self) -> str:
        return f"{self.archive}/{self.member}"


_OPEN: dict[tuple[int, Path, str], Any] = {}


def _open_once(archive: Path, kind: Literal["zip", "file"]) -> Any:
    """The archive opened as a ``zipfile.ZipFile`` or as a binary file, once per process (and left open)."""
    key = (os.getpid(), archive, kind)
    if key not in _OPEN:
        _OPEN[key] = zipfile.ZipFile(archive) if kind == "zip" else open(archive, "rb")
    return _OPEN[key]


def _is_zip(root: Path) -> bool:
    return root.is_file() and zipfile.is_zipfile(root)


def _check_image_root(root: Path, what: str) -> None:
    if root.is_dir() or _is_zip(root):
        return
    if root.is_file():
        raise DataError(f"image folder {str(root)!r} is a file but not a zip archive: unpack it into a folder, or "
                        f"{what} a folder of images or a .zip of one")
    raise DataError(f"image folder {str(root)!r} does not exist or is not a folder: {what} a folder of images "
                    "(flat, or one subfolder per class) or a .zip of one")


def _zip_images(root: Path) -> list[tuple[list[str], ZipMember]]:
    """(folders, member) of every file of the archive that looks like an image, outside hidden and tool folders.
    A folder holding all of them is the archive's wrapper (``img_align_celeba.zip`` holds
    ``img_align_celeba/*.jpg``), not a class: it is dropped, as unpacking and pointing at it would."""
    try:
        with zipfile.ZipFile(root) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"cannot read zip archive {str(root)!r} ({e}): replace it, or unpack it into a "
                        "folder") from None
    files = []
    looks_like_image = IMG_EXTENSIONS + UNREAD_IMAGE_EXTENSIONS
    for i in infos:
        *folders, name = i.filename.split("/")
        if all(_kept_folder(d) for d in folders) and Path(name).suffix.lower() in looks_like_image:
            direct = i.compress_type in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) and not i.flag_bits & 0x1
            files.append((folders, ZipMember(root, i.filename, i.file_size, i.CRC, i.header_offset,
                                             i.compress_type if direct else -1, i.compress_size)))
    while files and all(folders for folders, _ in files) and len({folders[0] for folders, _ in files}) == 1:
        files = [(folders[1:], m) for folders, m in files]
    return files


def _labelled_or_flat(root: Path, per_class: dict[str, list[Any]], loose: list[Any]) -> tuple[
        list[tuple[Any, int]], list[str]]:
    if per_class:
        classes = list(per_class)
        if loose:  # a flat folder with a stray subfolder would otherwise train on the subfolder alone
            warnings.warn(f"image folder {str(root)!r} has class subfolders ({len(classes)}: "
                          f"{', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}) and {len(loose)} image(s) "
                          f"directly in it, which are not used: every subfolder is a class. Move the loose images "
                          f"into a class subfolder, or the subfolders out, for a flat (unconditional) set",
                          SaganWarning, stacklevel=3)
        return [(f, label) for label, files in enumerate(per_class.values()) for f in files], classes
    if not loose:
        archives = sorted(p.name for p in _files_in(root) if p.suffix.lower() == ".zip") if root.is_dir() else []
        raise DataError(
            f"image folder {str(root)!r} holds no images ({', '.join(IMG_EXTENSIONS)}): "
            + (f"it holds {archives[0]!r}: set the path of the archive itself, {str(root / archives[0])!r}"
               if archives else "put images in it, flat or one subfolder per class")
        )
    return [(f, 0) for f in loose], []


def scan_image_folder(root: str | os.PathLike) -> tuple[list[tuple[Path | ZipMember, int]], list[str]]:
    """List (path, label) pairs and class names of an image folder, or of a zip archive of one.

    One subfolder per class (images found recursively inside each) makes a labelled set with classes in sorted
    order; images directly in ``root`` and no class subfolders make an unlabelled set (label 0, no classes).
    Hidden files and folders, macOS's ``__MACOSX`` and Synology's ``@eaDir`` are never classes or images.
    Images directly in a ``root`` that has class subfolders are not used, with a warning. A warning counts the
    files that look like images but are not read (:data:`UNREAD_IMAGE_EXTENSIONS`). In a zip archive, a folder
    that holds every image is not a class (see :func:`_zip_images`), and a folder without images is no class.
    """
    root = Path(root)
    _check_image_root(root, "set data.root to")
    unread: dict[str, int] = {}
    if root.is_file():
        groups: dict[str, list[ZipMember]] = {}
        loose = []
        for folders, m in _zip_images(root):
            (groups.setdefault(folders[0], []) if folders else loose).append(m)
        per_class = {c: _images_among(groups[c], unread) for c in sorted(groups)}
        loose = _images_among(loose, {} if per_class else unread)
        _warn_unread(root, unread)
        return _labelled_or_flat(root, {c: f for c, f in per_class.items() if f}, loose)
    with os.scandir(root) as entries:  # from the entries: a flat folder of 200,000 images is not stat'ed
        subdirs = sorted(Path(e.path) for e in entries if _kept_folder(e.name) and e.is_dir())
    if subdirs:
        per_class = {d.name: _images_among(_files_below(d), unread) for d in subdirs}
        _warn_unread(root, unread)
        for d in subdirs:
            if not per_class[d.name]:
                raise DataError(
                    f"class folder {str(d)!r} has no images ({', '.join(IMG_EXTENSIONS)}): add images to it or "
                    "remove it, since every subfolder of data.root is a class"
                )
        return _labelled_or_flat(root, per_class, _images_among(_files_in(root), {}))
    loose = _images_among(_files_in(root), unread)
    _warn_unread(root, unread)
    return _labelled_or_flat(root, {}, loose)


def list_images(root: str | os.PathLike) -> list[Path | ZipMember]:
    """Every image below ``root`` (a folder or a zip archive) at any depth (class subfolders or not, loose images
    included), sorted, as the image-folder path reads them: the files :func:`scan_image_folder` would skip are
    skipped, and files that look like images but are not read are counted in a warning. For comparing folders
    (``sagan evaluate --folders``), where classes do not matter."""
    root = Path(root)
    _check_image_root(root, "pass the path of")
    unread: dict[str, int] = {}
    found = [m for _, m in _zip_images(root)] if root.is_file() else _files_below(root)
    files = _images_among(found, unread)
    _warn_unread(root, unread)
    if not files:
        raise DataError(f"image folder {str(root)!r} holds no images ({', '.join(IMG_EXTENSIONS)}), at any depth")
    return files


def open_image(path: str | os.PathLike | ZipMember) -> Image.Image:
    """PIL's ``Image.open`` for a file or a :class:`ZipMember`."""
    return Image.open(io.BytesIO(path.read()) if isinstance(path, ZipMember) else path)


class ImageLoader:
    """Path -> uint8 array (C, R, R): PIL decode, convert to RGB or L, resize on the short side, centre crop.

    The one image-decoding path: training from a folder and ``sagan prepare`` both use it, so a prepared set holds
    exactly the folder path's pixels. Unreadable or truncated files raise :class:`DataError` naming the file.
    Before the conversion (:func:`to_8bit`): the EXIF orientation is applied (a camera's portrait photo is
    trained upright, as viewers show it), 16-bit and float images are scaled to 8 bits instead of clipped, and
    transparent pixels are composited onto ``background`` (an RGB colour; black by default). Large JPEGs decode at
    a reduced scale (PIL's ``draft``: the DCT's 1/2, 1/4 or 1/8, never below twice ``resolution`` on either side)
    before the antialiased resize
    (12-megapixel JPEGs at 32-128: 8.5x faster, PSNR at least 52 dB against the full decode; BENCHMARKS.md).
    """

    def __init__(self, resolution: int, channels: int, background: tuple[int, int, int] = BLACK) -> None:
        self.resolution, self.mode, self.background = resolution, "RGB" if channels == 3 else "L", background
        self.transform = transforms.Compose([transforms.Resize(resolution), transforms.CenterCrop(resolution)])

    def pil(self, img: Image.Image) -> np.ndarray:
        img = to_8bit(img, self.background).convert(self.mode)
        arr = np.array(self.transform(img), dtype=np.uint8)  # (R, R, C) or (R, R)
        return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))  # (C, R, R)

    def __call__(self, path: str | os.PathLike | ZipMember) -> np.ndarray:
        try:
            with open_image(path) as img:
                if img.format == "JPEG":
                    img.draft(None, (2 * self.resolution, 2 * self.resolution))
                img.load()  # decodes fully: truncated files fail here
                if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
                    img = ImageOps.exif_transpose(img)
                return self.pil(img)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError, zipfile.BadZipFile, zlib.error) as e:
            detail = "not an image format PIL identifies" if isinstance(e, UnidentifiedImageError) else e
            raise DataError(
                f"cannot read image {str(path)!r} ({type(e).__name__}: {detail}): remove or replace the file, "
                "or set data.bad_images: skip"
            ) from None


EXIF_ORIENTATION = 0x0112


def parse_background(colour: str | None, what: str = "data.background") -> tuple[int, int, int]:
    """``data.background`` -> an RGB triple: any colour PIL names ('black', 'white', '#7f7f7f', 'rgb(0,128,0)');
    None is black. A colour PIL cannot read is a :class:`ConfigError` naming ``what`` and the colour."""
    if colour is None:
        return BLACK
    try:
        rgb = ImageColor.getrgb(str(colour))
    except ValueError:
        raise ConfigError(f"{what} {colour!r} is not a colour: use a name ('black', 'white'), '#rrggbb' "
                          "or 'rgb(r, g, b)'") from None
    return tuple(rgb[:3])  # type: ignore[return-value]


def _colour(rgb: tuple[int, int, int]) -> str:
    return {BLACK: "black", (255, 255, 255): "white"}.get(rgb, "#%02x%02x%02x" % rgb)


def to_8bit(img: Image.Image, background: tuple[int, int, int] = BLACK) -> Image.Image:
    """An image PIL's ``convert`` to 'RGB' / 'L' would get wrong, made 8-bit first (others pass unchanged).

    * 16-bit integer ('I;16*'): x / 257, the full range onto 0..255 (``convert`` clips at 255: nearly white).
    * 32-bit integer ('I'): as 16-bit, unless its values fit in 0..255 already (then as they are).
    * float ('F'): values in [0, 1] are scaled by 255 (``convert`` truncates them to 0: black); others clipped.
    * transparency (alpha, or a palette's transparent index): composited onto ``background`` (black unless
      ``data.background`` says otherwise), so what lies under a fully transparent pixel (often arbitrary) never
      reaches the model.
    """
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)  # (H, W)
        if img.mode == "F":
            arr = arr * 255.0 if arr.size and np.nanmax(arr) <= 1.0 else arr
        elif img.mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr / 257.0
        return Image.fromarray(np.nan_to_num(arr).clip(0, 255).round().astype(np.uint8))  # mode L
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
    return img


class ImageFolderDataset(Dataset):
    """Images of :func:`scan_image_folder` as (uint8 (C, R, R), label).

    An unreadable or truncated file raises :class:`DataError` naming it (``bad_images="stop"``), or is skipped
    (``"skip"``): a warning names it, ``skipped`` counts it (per process / worker), and the next readable image of
    the folder is served in its place so batches keep their size.
    """

    def __init__(self, samples: list[tuple[Path | ZipMember, int]], loader: ImageLoader,
                 bad_images: str = "stop") -> None:
        self.samples, self.loader, self.bad_images = samples, loader, bad_images
        self.skipped: set[Path | ZipMember] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        for k in range(len(self.samples)):
            path, label = self.samples[(i + k) % len(self.samples)]
            if path in self.skipped:
                continue
            try:
                return torch.from_numpy(self.loader(path)), label
            except DataError:
                if self.bad_images == "stop":
                    raise
                self.skipped.add(path)
                warnings.warn(f"skipping unreadable image {str(path)!r}; {len(self.skipped)} skipped so far",
                              RankWarning, stacklevel=2)
        raise DataError(f"no image of the folder could be read ({len(self.skipped)} unreadable files)")


class _Transformed(Dataset):
    """(PIL image, label) items of a torchvision data set through an :class:`ImageLoader`'s resize / crop."""

    def __init__(self, ds: Any, loader: ImageLoader) -> None:
        self.ds, self.loader = ds, loader
        self.targets = getattr(ds, "targets", None)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        img, label = self.ds[i]
        return torch.from_numpy(self.loader.pil(img)), int(label)


def to_uint8_images(x: Tensor) -> Tensor:
    """Float images in [-1, 1] -> uint8, channels kept (the inverse of :func:`decode_images` up to rounding)."""
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def decode_images(x: Tensor) -> Tensor:
    """uint8 images (any shape) -> float32 in [-1, 1]: x / 127.5 - 1."""
    return x.float().div_(127.5).sub_(1.0)


class ResumableSampler(DistributedSampler):
    """Shuffled, sharded (one shard per process), drop-last sampler whose first epoch after a resume continues where
    the interrupted run stopped, so a resumed run sees exactly the batches an uninterrupted run would have seen.

    The permutation of epoch e depends only on (seed, e), as in ``DistributedSampler``; being a
    ``DistributedSampler``, Lightning leaves it in place under DDP and calls ``set_epoch`` on it.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.resumed, self.per_epoch = 0, 0

    def resume(self, samples_seen: int, samples_per_epoch: int) -> None:
        """Continue after ``samples_seen`` samples of this shard, ``samples_per_epoch`` of them per epoch: the
        next ``__iter__`` serves the rest of epoch ``samples_seen // samples_per_epoch``. The epoch comes from the
        count, not from ``set_epoch``: with workers Lightning may start the loader before it sets the epoch, and a
        run stopped at the end of an epoch restores the epoch it stopped in."""
        self.resumed, self.per_epoch = samples_seen, samples_per_epoch

    def __iter__(self):
        epoch, skip = (divmod(self.resumed, self.per_epoch) if self.resumed and self.per_epoch else (self.epoch, 0))
        self.resumed = 0
        g = torch.Generator().manual_seed(self.seed + epoch)
        indices = torch.randperm(len(self.dataset), generator=g)[: self.total_size]
        shard = indices[self.rank : self.total_size : self.num_replicas].tolist()  # (num_samples,)
        return iter(shard[skip:])


# ------------------------------------------------------------------------------------------------ data module
class SAGANData(pl.LightningDataModule):
    """Serves (image in [-1, 1], label) batches for training.

    Args:
        dataset: 'digits' (built-in, offline), 'cifar10', 'folder' or 'prepared' (written by ``sagan prepare``).
        root: folder of images (``folder``), CIFAR-10 root (``cifar10``), prepared set (``prepared``); unused for
            ``digits``.
        resolution: output size R (images are R x R); 32, 64 or 128.
        channels: 1 (grayscale) or 3 (RGB); None = the data set's own (digits 1, others 3).
        batch_size: per-process batch size.
        num_workers: DataLoader workers per process; None = from the CPUs this process may use (0 for the in-memory
            digits; the folder path uses all but one of them, at most 8). Workers persist across epochs.
        download: let torchvision download CIFAR-10 into ``root`` (needs internet).
        hflip: random horizontal flips, on the training device (off for digits, whose identity is not flip-invariant).
        in_memory: prepared sets: load the whole array into RAM instead of reading it through a memory map.
        bad_images: unreadable or truncated files in a folder: 'stop' with an error naming the file, or 'skip'
            (warn, count, serve the next readable image).
        seed: seed of the shuffling (None = the run's ``seed_everything`` seed).
        background: the colour that transparent pixels of images with an alpha channel (or a palette's
            transparent index) are composited onto: a colour PIL names ('black', 'white', '#rrggbb',
            'rgb(r, g, b)'). None = black; for a prepared set, the colour it was prepared with. Sprites and icons
            drawn on white: 'white'.
    """

    def __init__(
        self,
        dataset: Literal["digits", "cifar10", "folder", "prepared"] = "digits",
        root: str | None = None,
        resolution: int = 32,
        channels: int | None = None,
        batch_size: int = 64,
        num_workers: int | None = None,
        download: bool = False,
        hflip: bool = False,
        bad_images: Literal["stop", "skip"] = "stop",
        in_memory: bool = False,
        seed: int | None = None,
        background: str | None = None,
    ) -> None:
        super().__init__()
        root = user_path(root) if root else root  # before save_hyperparameters: the checkpoint keeps the real path
        rgb = parse_background(background)
        if bad_images not in ("stop", "skip"):
            raise ConfigError(f"data.bad_images must be 'stop' or 'skip', got {bad_images!r}")
        if dataset not in DATASETS:
            raise ConfigError(f"data.dataset {dataset!r} is unknown: choose one of {list(DATASETS)}")
        check_resolution(resolution)
        if dataset in ("cifar10", "folder", "prepared") and not root:
            raise ConfigError(f"data.root is required for dataset {dataset!r}: the folder that holds the images")
        if dataset == "digits" and root:  # e.g. configs/digits.yaml with --data.root: it would train on the digits
            raise ConfigError(f"data.root is {root!r} but data.dataset is 'digits', the built-in set, which reads no "
                              "folder: add --data.dataset folder to train on it (or prepared, cifar10), or drop "
                              "data.root")
        for setting, on, applies_to in (("in_memory", in_memory, "prepared"), ("download", download, "cifar10")):
            if on and dataset != applies_to:
                warnings.warn(f"data.{setting} is ignored: it applies to data.dataset {applies_to!r}, and this one is "
                              f"{dataset!r}", SaganWarning, stacklevel=2)
        self.manifest: dict[str, Any] | None = None
        if dataset == "prepared":
            from .prepared import read_manifest

            self.manifest = read_manifest(root)
            if self.manifest["resolution"] != resolution:
                raise ConfigError(
                    f"the prepared set {root!r} holds {self.manifest['resolution']}x{self.manifest['resolution']} "
                    f"images but data.resolution is {resolution}: set data.resolution "
                    f"{self.manifest['resolution']}, or prepare the source again at {resolution}"
                )
            prepared_on = tuple(self.manifest.get("background", BLACK))
            if background is not None and rgb != prepared_on:
                raise ConfigError(
                    f"the prepared set {root!r} was made with transparent pixels on {_colour(prepared_on)}, but "
                    f"data.background is {background!r}: leave data.background unset, or prepare the source again "
                    f"with --background {background}")
            rgb = prepared_on
            if channels is not None and channels != self.manifest["channels"]:
                raise ConfigError(f"the prepared set {root!r} has {self.manifest['channels']} channels, not "
                                  f"data.channels={channels}: leave data.channels unset or prepare it again")
            channels = self.manifest["channels"]
        if channels is None:
            channels = 1 if dataset == "digits" else 3
        if channels not in (1, 3):
            raise ConfigError(f"data.channels must be 1 or 3, got {channels}")
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
        if num_workers is not None and num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0 (or unset for automatic), got {num_workers}")
        self.save_hyperparameters()
        self.dataset, self.root, self.resolution, self.channels = dataset, root, resolution, channels
        self.batch_size, self.num_workers, self.download, self.hflip = batch_size, num_workers, download, hflip
        self.bad_images, self.seed, self.in_memory, self.background = bad_images, seed, in_memory, rgb
        self._samples: list[tuple[Path | ZipMember, int]] = []
        if dataset == "folder":
            self._samples, self.classes = scan_image_folder(root)
        elif dataset == "prepared":
            self.classes = list(self.manifest["classes"])
        else:
            self.classes = [str(i) for i in range(10)] if dataset == "digits" else [
                "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"
            ]
        self.train_set: Dataset | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for an unlabelled folder)."""
        return len(self.classes)

    def class_counts(self, split: str = "train") -> Tensor | None:
        """Images of each class in ``split`` (K,), int64; None for an unlabelled set (no classes)."""
        if not self.classes:
            return None
        return torch.bincount(self.labels(split), minlength=self.num_classes)

    def labels(self, split: str = "train") -> Tensor:
        """The class label of every image of ``split`` (N,), int64, in the data set's order, without decoding an
        image (0 for every image of an unlabelled set)."""
        if split not in self.splits:
            raise ConfigError(f"data set {self.dataset!r} has no split {split!r}; it has {list(self.splits)}")
        if self.dataset == "digits":
            labels = load_digits_arrays(split)[1]
        elif self.dataset == "folder":
            labels = torch.tensor([label for _, label in self._samples], dtype=torch.long)
        elif self.dataset == "prepared":
            from .prepared import LABELS

            labels = torch.from_numpy(np.load(Path(self.root) / LABELS, mmap_mode="r").astype(np.int64))
        else:
            labels = torch.tensor(self.build_dataset(split).targets, dtype=torch.long)  # type: ignore[attr-defined]
        return labels.long()

    def image_loader(self) -> ImageLoader:
        """The decoding / resizing of this data module's images (see :class:`ImageLoader`)."""
        return ImageLoader(self.resolution, self.channels, self.background)

    @property
    def splits(self) -> tuple[str, ...]:
        """Splits this data set has: 'train', and 'test' (held out) for digits and CIFAR-10."""
        return ("train", "test") if self.dataset in ("digits", "cifar10") else ("train",)

    def build_dataset(self, split: str = "train") -> Dataset:
        """The images of ``split`` as (uint8 (C, R, R), label) items, without random flips."""
        if split not in self.splits:
            raise ConfigError(f"data set {self.dataset!r} has no split {split!r}; it has {list(self.splits)}")
        if self.dataset == "digits":
            images8, labels = load_digits_arrays(split)
            return TensorDataset(to_uint8_images(digits_to_images(images8, self.resolution, self.channels)), labels)
        if self.dataset == "prepared":
            from .prepared import PreparedDataset

            return PreparedDataset(self.root, in_memory=self.in_memory)
        if self.dataset == "cifar10":
            from torchvision.datasets import CIFAR10

            try:
                ds = CIFAR10(self.root, train=split == "train", download=self.download)
            except RuntimeError as e:
                raise DataError(
                    f"CIFAR-10 not found under data.root={self.root!r} ({e}). Put the extracted "
                    "'cifar-10-batches-py' folder there, or set data.download: true on a machine with internet"
                ) from None
            return _Transformed(ds, self.image_loader())
        return ImageFolderDataset(self._samples, self.image_loader(), self.bad_images)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """On the training device: uint8 -> float in [-1, 1], and random horizontal flips when ``hflip``."""
        x, y = batch[0], batch[1]
        if x.dtype == torch.uint8:
            x = decode_images(x)
        if self.hflip and self.trainer is not None and self.trainer.training:
            flip = torch.rand(x.shape[0], device=x.device) < 0.5  # (B,)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, y

    def fingerprint(self, split: str = "train") -> str:
        """A short hash of what the images of ``split`` are made from, and how: changes when the data does.

        Digits: the pixel values. Folders: every file's relative path, size and modification time (in a zip archive,
        size and CRC-32). CIFAR-10: the same for its batch files. Prepared sets: the manifest's fingerprint (of its
        source and how it was made). Plus data set, split, resolution and channels, and ``background`` where it is
        not black.
        """
        h = hashlib.sha256(f"{self.dataset}|{split}|{self.resolution}|{self.channels}".encode())
        if self.dataset == "prepared":
            h.update(str(self.manifest["fingerprint"]).encode())
        elif self.dataset == "digits":
            images8, labels = load_digits_arrays(split)
            h.update(images8.numpy().tobytes())
            h.update(labels.numpy().tobytes())
        else:
            if self.dataset == "folder":
                files = [p for p, _ in self._samples]
                base = Path(self.root)
                h.update(f"|loader{LOADER_VERSION}".encode())
                if self.background != BLACK:  # black: the fingerprints (and reference caches) of before the switch
                    h.update(f"|background{self.background}".encode())
            else:
                base = Path(self.root) / "cifar-10-batches-py"
                if not base.is_dir():
                    raise DataError(f"CIFAR-10 not found under data.root={self.root!r}: put 'cifar-10-batches-py' there")
                files = sorted(p for p in base.iterdir() if p.is_file())
            for p in files:
                if isinstance(p, ZipMember):  # a member's CRC-32 changes with its bytes
                    h.update(f"{p.member}|{p.size}|{p.crc:08x}\n".encode())
                    continue
                st = p.stat()
                h.update(f"{p.relative_to(base)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    def reference_cache_name(self, split: str, weights_sha256: str) -> str:
        """Name of the cached reference statistics of ``split`` (see :mod:`sagan.metrics`): it changes whenever
        the data, the resolution, the channels or the feature extractor's weights do."""
        return f"sagan-{self.dataset}-{split}-{self.fingerprint(split)}-{weights_sha256[:12]}"

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self.build_dataset("train")
            if len(self.train_set) < self.batch_size:
                raise DataError(
                    f"the training set has {len(self.train_set)} images, fewer than data.batch_size="
                    f"{self.batch_size}: lower the batch size or add images"
                )

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches, one shard per process; after a resume, the first epoch continues where it stopped.

        The position comes from the module's count of batches trained on (saved in its checkpoint) and the epoch
        Lightning restored; the loader's own random generator keeps worker seeding off the global RNG. Workers do
        nothing random (flips happen on the device), so the worker count never changes what is served.
        """
        assert self.train_set is not None, "call setup() first"
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        sampler = ResumableSampler(self.train_set, num_replicas=world, rank=rank, seed=seed)
        per_epoch = len(sampler) // self.batch_size
        module = trainer.lightning_module if trainer is not None else None
        seen = int(getattr(module, "batches_seen", 0))
        if seen and per_epoch:
            sampler.resume(seen * self.batch_size, per_epoch * self.batch_size)
        workers = self.workers(world)
        from .prepared import PreparedDataset, stacked_batch

        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(seed + rank),
            collate_fn=stacked_batch if isinstance(self.train_set, PreparedDataset) else None,
        )

    def workers(self, processes_per_node: int = 1) -> int:
        """``num_workers``, or when unset: 0 for the in-memory digits, else the CPUs this process may use divided
        among the node's training processes, less one for the training process itself (1 to 8)."""
        if self.num_workers is not None:
            return self.num_workers
        if self.dataset == "digits" or (self.dataset == "prepared" and self.in_memory):
            return 0
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 1
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or min(processes_per_node, max(1, torch.cuda.device_count()))
        return max(1, min(8, cpus // max(1, local) - 1))
