"""Shared fixtures: CPU only, offline W&B, small images written on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("WANDB_MODE", "offline")
if os.environ.get("SAGAN_TEST_GPU") != "1":  # the CPU suite never touches a GPU; `make test-gpu` sets it to 1
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parent.parent

# Command-line overrides that make any config tiny and quick (CPU, a few steps, no progress bar).
TINY = [
    "--model.g_ch", "8", "--model.d_ch", "8", "--model.z_dim", "16",
    "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
    "--trainer.log_every_n_steps", "1", "--fid.every_n_steps", "0", "--attention_maps.every_n_steps", "0",
    "--trainer.logger", "false",
]


def run_cli(args: list[str]) -> int:
    """Run the real ``sagan`` entry point in-process; its exit status (0 when it returns)."""
    from sagan.cli import main

    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def write_images(folder: Path, n: int, size: int = 40, mode: str = "RGB", seed: int = 0) -> list[Path]:
    """n random PNG images of size x size in folder."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
        p = folder / f"img_{i:03d}.png"
        Image.fromarray(arr, mode=mode).save(p)
        paths.append(p)
    return paths


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    root = tmp_path / "classes"
    write_images(root / "cat", 10, seed=1)
    write_images(root / "dog", 10, seed=2)
    return root


def sigint_as_in_a_terminal() -> None:
    """``preexec_fn`` for a subprocess that a test interrupts with SIGINT: a test run started in the background (a
    shell's ``&``, some CI runners) ignores SIGINT, its children inherit that, and Python then never raises
    KeyboardInterrupt. A terminal's Ctrl-C meets the default disposition: restore it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
