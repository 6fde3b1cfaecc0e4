"""`sagan prepare` and training from prepared sets: the folder path's pixels, clear errors, disjoint DDP shards."""

import json
import subprocess
import sys

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from sagan.data import SAGANData
from sagan.errors import DataError
from sagan.prepared import IMAGES, PreparedDataset, prepare, read_manifest

from conftest import REPO, TINY, run_cli, sigint_as_in_a_terminal, write_images


def _images(ds) -> tuple[torch.Tensor, torch.Tensor]:
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


@pytest.mark.parametrize("channels", [3, 1])
def test_prepared_set_holds_exactly_the_folder_paths_pixels(class_folder, tmp_path, channels):
    out = tmp_path / "prep"
    m = prepare(str(class_folder), out, resolution=32, channels=channels, workers=2, progress=False)
    assert m["count"] == 20 and m["classes"] == ["cat", "dog"] and m["channels"] == channels
    assert m["resolution"] == 32 and m["source"]["kind"] == "folder" and len(m["fingerprint"]) == 16
    assert read_manifest(out) == m
    folder = SAGANData("folder", root=str(class_folder), resolution=32, channels=channels).build_dataset()
    prepared = SAGANData("prepared", root=str(out), resolution=32).build_dataset()
    xf, yf = _images(folder)
    xp, yp = _images(prepared)
    assert xp.dtype == torch.uint8 and xp.shape == (20, channels, 32, 32)
    assert torch.equal(xf, xp) and torch.equal(yf, yp)  # the same bytes, no re-encoding
    batch = prepared.__getitems__([3, 0, 7])  # the DataLoader's batched read
    assert torch.equal(batch[0][0], xp[[3, 0, 7]]) and torch.equal(batch[0][1], yp[[3, 0, 7]])
    in_memory = PreparedDataset(out, in_memory=True)
    assert torch.equal(_images(in_memory)[0], xp)


def test_prepared_set_keeps_the_background_it_was_made_with(tmp_path, capsys):
    """`sagan prepare --background white` composites as the folder path does, records the colour, and training
    on the set uses it; asking the set for another colour is one clear line."""
    from sagan.errors import ConfigError
    from sagan.prepared import main

    a = np.zeros((32, 32, 4), np.uint8)
    a[8:24, 8:24] = (255, 0, 0, 255)  # opaque red on transparent black
    (tmp_path / "src").mkdir()
    Image.fromarray(a).save(tmp_path / "src" / "s.png")
    out = tmp_path / "prep"
    assert main(["--source", str(tmp_path / "src"), "--out", str(out), "--resolution", "32", "--background",
                 "white", "--workers", "1"]) == 0
    assert read_manifest(out)["background"] == [255, 255, 255]
    dm = SAGANData("prepared", root=str(out), resolution=32)
    assert dm.background == (255, 255, 255)
    x = dm.build_dataset()[0][0]
    folder = SAGANData("folder", root=str(tmp_path / "src"), resolution=32, background="white").build_dataset()
    assert torch.equal(x, folder[0][0]) and x[:, 2, 2].tolist() == [255, 255, 255]
    assert SAGANData("prepared", root=str(out), resolution=32, background="#fff").background == (255, 255, 255)
    with pytest.raises(ConfigError, match=r"made with transparent pixels on white, but data.background is 'black'"):
        SAGANData("prepared", root=str(out), resolution=32, background="black")
    capsys.readouterr()
    assert main(["--source", str(tmp_path / "src"), "--out", str(tmp_path / "p2"), "--resolution", "32",
                 "--background", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sagan prepare: error: --background 'nope' is not a colour") and err.count("\n") == 1
    assert not (tmp_path / "p2").exists()


class _Record(pl.Callback):
    """The batches as training_step receives them (decoded and flipped on the device)."""

    def __init__(self) -> None:
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append((batch[0].clone(), batch[1].clone()))


def _fit_batches(dm: SAGANData, tmp_path, steps: int = 6) -> list:
    from sagan.module import SAGAN

    pl.seed_everything(3, verbose=False)
    model = SAGAN(resolution=32, img_channels=dm.channels, num_classes=dm.num_classes, z_dim=16, g_ch=8, d_ch=8,
                  g_attn=[16], d_attn=[16])
    rec = _Record()
    pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
               callbacks=[rec]).fit(model, dm)
    return rec.batches


def test_training_batches_from_prepared_equal_the_folder_path(class_folder, tmp_path):
    out = tmp_path / "prep"
    prepare(str(class_folder), out, resolution=32, progress=False)
    kw = dict(resolution=32, batch_size=4, hflip=True)
    from_folder = _fit_batches(SAGANData("folder", root=str(class_folder), num_workers=2, **kw), tmp_path / "a")
    from_prepared = _fit_batches(SAGANData("prepared", root=str(out), num_workers=2, **kw), tmp_path / "b")
    assert len(from_folder) == len(from_prepared) == 3  # 6 optimizer steps = 3 batches (n_dis = 1)
    flipped = 0
    for (xa, ya), (xb, yb) in zip(from_folder, from_prepared, strict=True):
        assert xa.dtype == torch.float32 and xa.min() >= -1 and xa.max() <= 1
        assert torch.equal(xa, xb) and torch.equal(ya, yb)  # same order, same pixels, same flips
        flipped += int((xa != xa.flip(-1)).any())
    no_flip = _fit_batches(SAGANData("prepared", root=str(out), num_workers=0, resolution=32, batch_size=4), tmp_path / "c")
    assert sum(not torch.equal(a[0], b[0]) for a, b in zip(from_prepared, no_flip)) > 0  # flips really happen


def test_bad_source_images_stop_or_are_skipped_at_prepare_time(tmp_path, capsys):
    paths = write_images(tmp_path / "imgs", 10, size=32)
    paths[4].write_bytes(b"not an image")
    out = tmp_path / "prep"
    code = run_cli(["prepare", "--source", str(tmp_path / "imgs"), "--out", str(out), "--resolution", "32"])
    err = capsys.readouterr().err
    assert code == 2 and "img_004.png" in err and "--bad-images skip" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob("prep.tmp-*"))  # nothing half-written
    code = run_cli(["prepare", "--source", str(tmp_path / "imgs"), "--out", str(out), "--resolution", "32",
                    "--bad-images", "skip"])
    printed = capsys.readouterr().out
    assert code == 0 and "skipped 1 unreadable" in printed
    m = json.loads((out / "manifest.json").read_text())
    assert m["count"] == 9 and len(m["skipped"]) == 1 and m["skipped"][0].endswith("img_004.png")
    assert run_cli(["prepare", "--source", str(tmp_path / "imgs"), "--out", str(out), "--resolution", "32"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_prepare_arguments_are_checked_by_their_flag_names(tmp_path, capsys):
    """Mistakes in `sagan prepare`'s own flags are one line naming the flag, before anything is written: not the
    training config's names (data.resolution, data.root), and no flag silently ignored (--root / --split with an
    image folder, a negative --workers)."""
    src = tmp_path / "imgs"
    write_images(src, 4, size=32)
    out = tmp_path / "prep"
    base = ["prepare", "--source", str(src), "--out", str(out)]
    cases = {
        "--resolution 48 is not supported": ["--resolution", "48"],
        "--channels must be 1 (grayscale) or 3 (RGB), got 2": ["--resolution", "32", "--channels", "2"],
        "--workers must be >= 0": ["--resolution", "32", "--workers", "-2"],
        "--root and --split are for --source cifar10": ["--resolution", "32", "--split", "test"],
        "--root and --split are for --source cifar10;": ["--resolution", "32", "--root", str(tmp_path)],
    }
    cifar = ["prepare", "--source", "cifar10", "--out", str(out), "--resolution", "32"]
    for says, args in [*((k, base + v) for k, v in cases.items()),
                       ("--source cifar10 needs --root", cifar),
                       ("--split must be train or test for CIFAR-10", cifar + ["--root", str(tmp_path), "--split", "val"]),
                       (f"CIFAR-10 not found under --root {str(tmp_path)!r}", cifar + ["--root", str(tmp_path)])]:
        assert run_cli(args) == 2, says
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1 and "data." not in err.replace("--data.download", ""), err
        assert not out.exists()
    assert run_cli(base + ["--resolution", "32", "--workers", "0"]) == 0 and read_manifest(out)["count"] == 4


def test_truncated_or_foreign_prepared_set_is_one_clear_error(class_folder, tmp_path, capsys):
    out = tmp_path / "prep"
    prepare(str(class_folder), out, resolution=32, progress=False)
    data = (out / IMAGES).read_bytes()
    (out / IMAGES).write_bytes(data[: len(data) // 2])  # a copy that broke off
    with pytest.raises(DataError, match=r"damaged.*truncated copy"):
        SAGANData("prepared", root=str(out), resolution=32)
    args = ["fit", "--config", str(REPO / "configs/celeba64.yaml"), *TINY, "--output_root", str(tmp_path / "runs"),
            "--data.dataset", "prepared", "--data.root", str(out), "--data.resolution", "32",
            "--model.g_attn", "[16]", "--model.d_attn", "[16]", "--trainer.max_steps", "2"]
    assert run_cli(args) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and "Traceback" not in err
    with pytest.raises(DataError, match="not a prepared data set"):
        SAGANData("prepared", root=str(class_folder), resolution=32)
    (out / IMAGES).write_bytes(data)
    with pytest.raises(Exception, match="data.resolution 32"):
        SAGANData("prepared", root=str(out), resolution=64)
    with pytest.raises(DataError, match="Mount the bucket"):  # object stores go through a mount, said in one line
        SAGANData("prepared", root="s3://bucket/celeba64", resolution=64)


def _indexed_set(tmp_path, n: int = 50) -> str:
    """A prepared set whose image i carries i in its first two pixels."""
    folder = tmp_path / "indexed"
    folder.mkdir()
    for i in range(n):
        arr = np.zeros((32, 32, 3), np.uint8)
        arr[0, 0] = (i % 256, i // 256, 7)
        Image.fromarray(arr).save(folder / f"{i:05d}.png")
    out = tmp_path / "indexed-prep"
    prepare(str(folder), out, resolution=32, progress=False)
    return str(out)


@pytest.mark.timeout(300)
def test_ddp_ranks_read_disjoint_shards_that_cover_the_data(tmp_path):
    root = _indexed_set(tmp_path)
    res = subprocess.run([sys.executable, str(REPO / "tests/ddp_script.py"), "--out", str(tmp_path / "o"),
                          "--devices", "2", "--batch", "5", "--steps", "10", "--prepared", root, "--plain-noise"],
                         capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    seen = [torch.load(tmp_path / "o" / f"rank{r}.pt", weights_only=True)["indices"] for r in (0, 1)]
    a, b = set(seen[0]), set(seen[1])
    assert len(seen[0]) == len(a) == 25 and len(seen[1]) == len(b) == 25  # one epoch: 5 batches of 5 per rank
    assert not a & b and a | b == set(range(50))


def test_a_slow_loader_is_reported_with_the_fix(tmp_path, monkeypatch, capsys):
    import time

    from sagan.data import ImageLoader

    real_call = ImageLoader.__call__

    def slow(self, path):  # a network file system, say: 30 ms per image
        time.sleep(0.03)
        return real_call(self, path)

    monkeypatch.setattr(ImageLoader, "__call__", slow)
    write_images(tmp_path / "imgs", 16, size=32)
    args = ["fit", "--config", str(REPO / "configs/celeba64.yaml"), *TINY, "--output_root", str(tmp_path / "runs"),
            "--data.root", str(tmp_path / "imgs"), "--data.resolution", "32", "--data.batch_size", "4",
            "--data.num_workers", "0", "--model.g_attn", "[16]", "--model.d_attn", "[16]",
            "--trainer.max_steps", "16", "--samples.every_n_steps", "0",
            "--loader_monitor.warmup", "1", "--loader_monitor.window", "3"]
    assert run_cli(args) == 0
    out = capsys.readouterr().out
    assert "the data loader, not the model, is the bottleneck" in out and "sagan prepare --source" in out
    monkeypatch.setattr(ImageLoader, "__call__", real_call)
    assert run_cli([*args, "--experiment", "fast"]) == 0
    assert "bottleneck" not in capsys.readouterr().out  # 16 tiny images from the page cache: the model is slower


@pytest.mark.timeout(120)
def test_ctrl_c_stops_every_worker_with_one_line_and_leaves_nothing(tmp_path):
    """Ctrl-C reaches the whole process group, the decoding workers too: one line from the parent, no worker
    tracebacks, exit 130, and neither the output nor its temporary folder left behind."""
    import os
    import signal
    import time

    src = tmp_path / "big"
    src.mkdir()
    big = Image.new("RGB", (6000, 6000), (10, 20, 30))  # ~0.7 s to decode each: the workers are busy for seconds
    for i in range(8):
        big.save(src / f"{i}.png", compress_level=1)
    out = tmp_path / "prepared"
    proc = subprocess.Popen([sys.executable, "-m", "sagan.cli", "prepare", "--source", str(src), "--out", str(out),
                             "--resolution", "32", "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=sigint_as_in_a_terminal)
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:  # until both workers run
            kids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            if len(kids) >= 2:
                break
            time.sleep(0.05)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "sagan prepare: interrupted", err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"]


def _zip(folder, archive, replace: dict | None = None) -> None:
    """``folder`` zipped as a zip tool would: inside a wrapper folder of its name, with macOS's __MACOSX twins and a
    NAS's thumbnails; half the members deflated, half stored (as most zips of JPEGs are)."""
    import zipfile

    with zipfile.ZipFile(archive, "w") as z:
        for i, p in enumerate(sorted(folder.rglob("*.png"))):
            name = f"{folder.name}/{p.relative_to(folder).as_posix()}"
            data = (replace or {}).get(p.name, p.read_bytes())
            z.writestr(name, data, zipfile.ZIP_DEFLATED if i % 2 else zipfile.ZIP_STORED)
            z.writestr(f"__MACOSX/{name.rpartition('/')[0]}/._{p.name}", b"\x00\x05\x16\x07 AppleDouble")
        z.writestr(f"{folder.name}/cat/@eaDir/img_000.png/SYNOFILE_THUMB_S.png",
                   (folder / "cat/img_000.png").read_bytes())
        z.writestr(f"{folder.name}/notes.txt", b"not an image")


def test_a_zip_archive_of_a_folder_trains_and_prepares_as_the_folder(class_folder, tmp_path, capsys):
    """data.root (and sagan prepare --source) may be a .zip of an image folder, read in place: the same classes,
    pixels and training batches (DataLoader workers each open the archive) as the unpacked folder."""
    archive = tmp_path / "classes.zip"
    _zip(class_folder, archive)
    kw = dict(resolution=32, batch_size=4, hflip=True)
    folder, zipped = SAGANData("folder", root=str(class_folder), **kw), SAGANData("folder", root=str(archive), **kw)
    assert zipped.classes == folder.classes == ["cat", "dog"]  # the wrapper folder is not a class
    xf, yf = _images(folder.build_dataset())
    xz, yz = _images(zipped.build_dataset())
    assert torch.equal(xf, xz) and torch.equal(yf, yz)
    from_folder = _fit_batches(SAGANData("folder", root=str(class_folder), num_workers=2, **kw), tmp_path / "a")
    from_zip = _fit_batches(SAGANData("folder", root=str(archive), num_workers=2, **kw), tmp_path / "b")
    assert len(from_zip) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(from_folder, from_zip, strict=True))
    m = prepare(str(archive), tmp_path / "prep", resolution=32, workers=2, progress=False)
    assert m["classes"] == ["cat", "dog"]
    prepared = SAGANData("prepared", root=str(tmp_path / "prep"), resolution=32).build_dataset()
    assert torch.equal(_images(prepared)[0], xf)

    # the fingerprint (cached reference statistics) follows the members' bytes, not the archive's date
    _zip(class_folder, tmp_path / "again.zip")
    assert SAGANData("folder", root=str(tmp_path / "again.zip"), **kw).fingerprint() == zipped.fingerprint()
    other = (class_folder / "dog/img_003.png").read_bytes()
    _zip(class_folder, tmp_path / "changed.zip", replace={"img_003.png": other})
    assert SAGANData("folder", root=str(tmp_path / "changed.zip"), **kw).fingerprint() != zipped.fingerprint()

    # a broken member is named inside its archive; a file that is no zip is named with the fix
    _zip(class_folder, tmp_path / "broken.zip", replace={"img_005.png": b"not an image at all"})
    with pytest.raises(DataError, match=r"cannot read image '.*broken\.zip/classes/cat/img_005\.png' "
                                        r"\(UnidentifiedImageError: not an image format"):
        _images(SAGANData("folder", root=str(tmp_path / "broken.zip"), **kw).build_dataset())
    # members read straight from the archive (stored, deflated) or through zipfile (bzip2, lzma): the same pixels;
    # flipped bytes in a deflated member are named, not decoded into a wrong image
    import zipfile

    from sagan.data import ImageLoader, scan_image_folder

    cats = sorted((class_folder / "cat").glob("*.png"))[:4]
    methods = [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]
    with zipfile.ZipFile(tmp_path / "methods.zip", "w") as z:
        for p, method in zip(cats, methods, strict=True):
            info = zipfile.ZipInfo(p.name)
            info.compress_type = method
            info.extra = b"UT\x05\x00\x01" + bytes(4)  # a timestamp field, as Info-ZIP and macOS write
            z.writestr(info, p.read_bytes())
    loader = ImageLoader(32, 3)
    members = [m for m, _ in scan_image_folder(tmp_path / "methods.zip")[0]]
    assert all(np.array_equal(loader(m), loader(p)) for m, p in zip(members, cats, strict=True))
    raw = bytearray((tmp_path / "methods.zip").read_bytes())
    deflated = members[1]
    start = deflated.offset + 30 + len(deflated.member) + 9  # the deflate stream
    for at, says in ((40, "BadZipFile: bad CRC-32"), (0, "error: Error -3 while decompressing")):
        flipped = bytearray(raw)
        flipped[start + at] ^= 0xFF
        (tmp_path / "flipped.zip").write_bytes(bytes(flipped))
        with pytest.raises(DataError, match=rf"flipped\.zip/img_001\.png' \({says}"):
            loader(scan_image_folder(tmp_path / "flipped.zip")[0][1][0])
    (tmp_path / "set.tar").write_bytes(b"\x00" * 1024)
    with pytest.raises(DataError, match=r"'.*set\.tar' is a file but not a zip archive: unpack it"):
        SAGANData("folder", root=str(tmp_path / "set.tar"), **kw)
