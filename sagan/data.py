"""Training data: any image folder, CIFAR-10 (torchvision), and the built-in offline *digits* set.

Images come out as float tensors (C, R, R) in [-1, 1] with an integer class label (0 for unlabelled data).

* ``folder``: a folder of images, flat (unconditional) or one subfolder per class (class-conditional), read with
  PIL, resized on the short side and centre-cropped to ``resolution``.
* ``cifar10``: ``torchvision.datasets.CIFAR10`` from a local ``root`` (``download: true`` fetches it when online).
* ``digits``: scikit-learn's ``load_digits`` (1,797 real 8x8 handwritten digits, 10 classes, shipped inside the
  scikit-learn package, so it works offline), upsampled to ``resolution``; a fixed stratified 80/20 split.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset
from torchvision import transforms

from .errors import ConfigError, DataError
from .models import check_resolution

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DATASETS = ("digits", "cifar10", "folder")
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
def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith(".")


def scan_image_folder(root: str | os.PathLike) -> tuple[list[tuple[Path, int]], list[str]]:
    """List (path, label) pairs and class names of an image folder.

    One subfolder per class (images found recursively inside each) makes a labelled set with classes in sorted
    order; images directly in ``root`` and no class subfolders make an unlabelled set (label 0, no classes).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"image folder {str(root)!r} does not exist or is not a folder: set data.root to a folder of images "
            "(flat, or one subfolder per class)"
        )
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs:
        classes, samples = [], []
        for label, d in enumerate(subdirs):
            files = sorted(p for p in d.rglob("*") if _is_image(p))
            if not files:
                raise DataError(
                    f"class folder {str(d)!r} has no images ({', '.join(IMG_EXTENSIONS)}): add images to it or "
                    "remove it, since every subfolder of data.root is a class"
                )
            classes.append(d.name)
            samples += [(f, label) for f in files]
        return samples, classes
    files = sorted(p for p in root.iterdir() if _is_image(p))
    if not files:
        raise DataError(
            f"image folder {str(root)!r} holds no images ({', '.join(IMG_EXTENSIONS)}): put images in it, "
            "flat or one subfolder per class"
        )
    return [(f, 0) for f in files], []


class ImageFolderDataset(Dataset):
    """Images of :func:`scan_image_folder`.

    An unreadable or truncated file raises :class:`DataError` naming it (``bad_images="stop"``), or is skipped
    (``"skip"``): a warning names it, ``skipped`` counts it (per process / worker), and the next readable image of
    the folder is served in its place so batches keep their size.
    """

    def __init__(self, samples: list[tuple[Path, int]], transform: transforms.Compose, mode: str,
                 bad_images: str = "stop") -> None:
        self.samples, self.transform, self.mode, self.bad_images = samples, transform, mode, bad_images
        self.skipped: set[Path] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: Path) -> Image.Image:
        with Image.open(path) as img:
            return img.convert(self.mode)  # decodes fully: truncated files fail here

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        for k in range(len(self.samples)):
            path, label = self.samples[(i + k) % len(self.samples)]
            if path in self.skipped:
                continue
            try:
                return self.transform(self._load(path)), label
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
                if self.bad_images == "stop":
                    raise DataError(
                        f"cannot read image {str(path)!r} ({type(e).__name__}: {e}): remove or replace the file, "
                        "or set data.bad_images: skip"
                    ) from None
                self.skipped.add(path)
                warnings.warn(f"skipping unreadable image {str(path)!r} ({type(e).__name__}); "
                              f"{len(self.skipped)} skipped so far", stacklevel=2)
        raise DataError(f"no image of the folder could be read ({len(self.skipped)} unreadable files)")


class ResumableSampler(DistributedSampler):
    """Shuffled, sharded (one shard per process), drop-last sampler whose first epoch after a resume starts
    ``skip`` samples in, so a resumed run sees exactly the batches an uninterrupted run would have seen.

    The permutation of epoch e depends only on (seed, e), as in ``DistributedSampler``; being a
    ``DistributedSampler``, Lightning leaves it in place under DDP and calls ``set_epoch`` on it.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        indices = torch.randperm(len(self.dataset), generator=g)[: self.total_size]
        shard = indices[self.rank : self.total_size : self.num_replicas].tolist()  # (num_samples,)
        skip, self.skip = self.skip, 0
        return iter(shard[skip:])


# ------------------------------------------------------------------------------------------------ data module
class SAGANData(pl.LightningDataModule):
    """Serves (image in [-1, 1], label) batches for training.

    Args:
        dataset: 'digits' (built-in, offline), 'cifar10' or 'folder'.
        root: folder of images (``folder``) or CIFAR-10 root (``cifar10``); unused for ``digits``.
        resolution: output size R (images are R x R); 32, 64 or 128.
        channels: 1 (grayscale) or 3 (RGB); None = the data set's own (digits 1, others 3).
        batch_size: per-process batch size.
        num_workers: DataLoader workers.
        download: let torchvision download CIFAR-10 into ``root`` (needs internet).
        hflip: random horizontal flips (off for digits, whose identity is not flip-invariant).
        bad_images: unreadable or truncated files in a folder: 'stop' with an error naming the file, or 'skip'
            (warn, count, serve the next readable image).
        seed: seed of the shuffling (None = the run's ``seed_everything`` seed).
    """

    def __init__(
        self,
        dataset: Literal["digits", "cifar10", "folder"] = "digits",
        root: str | None = None,
        resolution: int = 32,
        channels: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        download: bool = False,
        hflip: bool = False,
        bad_images: Literal["stop", "skip"] = "stop",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if bad_images not in ("stop", "skip"):
            raise ConfigError(f"data.bad_images must be 'stop' or 'skip', got {bad_images!r}")
        if dataset not in DATASETS:
            raise ConfigError(f"data.dataset {dataset!r} is unknown: choose one of {list(DATASETS)}")
        check_resolution(resolution)
        if channels is None:
            channels = 1 if dataset == "digits" else 3
        if channels not in (1, 3):
            raise ConfigError(f"data.channels must be 1 or 3, got {channels}")
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
        if dataset in ("cifar10", "folder") and not root:
            raise ConfigError(f"data.root is required for dataset {dataset!r}: the folder that holds the images")
        self.save_hyperparameters()
        self.dataset, self.root, self.resolution, self.channels = dataset, root, resolution, channels
        self.batch_size, self.num_workers, self.download, self.hflip = batch_size, num_workers, download, hflip
        self.bad_images, self.seed = bad_images, seed
        self._samples: list[tuple[Path, int]] = []
        if dataset == "folder":
            self._samples, self.classes = scan_image_folder(root)
        else:
            self.classes = [str(i) for i in range(10)] if dataset == "digits" else [
                "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"
            ]
        self.train_set: Dataset | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for an unlabelled folder)."""
        return len(self.classes)

    def _pil_transform(self, augment: bool = True) -> transforms.Compose:
        t: list = [transforms.Resize(self.resolution), transforms.CenterCrop(self.resolution)]
        if self.hflip and augment:
            t.append(transforms.RandomHorizontalFlip())
        t += [transforms.ToTensor(), transforms.Normalize([0.5] * self.channels, [0.5] * self.channels)]
        return transforms.Compose(t)

    @property
    def splits(self) -> tuple[str, ...]:
        """Splits this data set has: 'train', and 'test' (held out) for digits and CIFAR-10."""
        return ("train",) if self.dataset == "folder" else ("train", "test")

    def build_dataset(self, split: str = "train", augment: bool = True) -> Dataset:
        """The images of ``split``; ``augment=False`` leaves out random flips (for reference statistics)."""
        if split not in self.splits:
            raise ConfigError(f"data set {self.dataset!r} has no split {split!r}; it has {list(self.splits)}")
        train = split == "train"
        if self.dataset == "digits":
            images8, labels = load_digits_arrays(split)
            return TensorDataset(digits_to_images(images8, self.resolution, self.channels), labels)
        if self.dataset == "cifar10":
            from torchvision.datasets import CIFAR10

            try:
                ds = CIFAR10(self.root, train=train, download=self.download)
            except RuntimeError as e:
                raise DataError(
                    f"CIFAR-10 not found under data.root={self.root!r} ({e}). Put the extracted "
                    "'cifar-10-batches-py' folder there, or set data.download: true on a machine with internet"
                ) from None
            ds.transform = self._pil_transform(augment) if self.channels == 3 else transforms.Compose(
                [transforms.Grayscale(), self._pil_transform(augment)]
            )
            return ds
        return ImageFolderDataset(self._samples, self._pil_transform(augment), "RGB" if self.channels == 3 else "L",
                                  self.bad_images)

    def fingerprint(self, split: str = "train") -> str:
        """A short hash of what the images of ``split`` are made from, and how: changes when the data does.

        Digits: the pixel values. Folders: every file's relative path, size and modification time. CIFAR-10: the
        same for its batch files. Plus data set, split, resolution and channels.
        """
        h = hashlib.sha256(f"{self.dataset}|{split}|{self.resolution}|{self.channels}".encode())
        if self.dataset == "digits":
            images8, labels = load_digits_arrays(split)
            h.update(images8.numpy().tobytes())
            h.update(labels.numpy().tobytes())
        else:
            if self.dataset == "folder":
                files = [p for p, _ in self._samples]
                base = Path(self.root)
            else:
                base = Path(self.root) / "cifar-10-batches-py"
                if not base.is_dir():
                    raise DataError(f"CIFAR-10 not found under data.root={self.root!r}: put 'cifar-10-batches-py' there")
                files = sorted(p for p in base.iterdir() if p.is_file())
            for p in files:
                st = p.stat()
                h.update(f"{p.relative_to(base)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

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
        Lightning restored; the loader's own random generator keeps worker seeding off the global RNG, so
        resuming does not shift the model's random stream.
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
            sampler.skip = max(0, min(per_epoch, seen - trainer.current_epoch * per_epoch)) * self.batch_size
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(seed + rank),
        )
