"""`sagan generate`: seeds, classes, grids, truncation, interpolation, attention maps, safe loading."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sagan.generate import main as generate_main
from sagan.sampling import class_names, generator_from_checkpoint, latents_for_seeds, parse_class, parse_seeds

from conftest import REPO, TINY, run_cli, sigint_as_in_a_terminal, write_images




@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    common = [*TINY, "--output_root", str(root), "--samples.every_n_steps", "0", "--trainer.max_steps", "4",
              "--data.batch_size", "8"]
    assert run_cli(["fit", "--config", str(REPO / "configs/digits.yaml"), "--experiment", "cond", *common]) == 0
    write_images(root / "flat", 10, size=32)
    assert run_cli(["fit", "--config", str(REPO / "configs/celeba64.yaml"), "--experiment", "uncond", *common,
                    "--data.root", str(root / "flat"), "--data.resolution", "32", "--data.num_workers", "0",
                    "--model.g_attn", "[16, 32]", "--model.d_attn", "[16]"]) == 0
    for name, seed in (("dog", 1), ("cat", 2), ("zebra", 3)):
        write_images(root / "named" / name, 8, size=32, seed=seed)
    assert run_cli(["fit", "--config", str(REPO / "configs/folder32.yaml"), "--experiment", "named", *common,
                    "--data.root", str(root / "named"), "--data.num_workers", "0"]) == 0
    return {"cond": root / "cond/checkpoints/last.ckpt", "uncond": root / "uncond/checkpoints/last.ckpt",
            "named": root / "named/checkpoints/last.ckpt"}


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_parse_seeds():
    assert parse_seeds("0-3,10") == [0, 1, 2, 3, 10]
    assert parse_seeds("7") == [7]
    for bad in ("3-1", "a", "-2", ""):
        with pytest.raises(ValueError, match="bad seed list"):
            parse_seeds(bad)


def test_same_seed_same_image_whatever_the_batch_size(ckpts, tmp_path, capsys):
    for bs in (1, 7):
        assert generate_main(["--ckpt", str(ckpts["cond"]), "--outdir", str(tmp_path / f"b{bs}"),
                              "--seeds", "0-9", "--batch-size", str(bs)]) == 0
    assert "10 images in" in capsys.readouterr().out
    for s in range(10):
        assert np.array_equal(png(tmp_path / "b1" / f"{s:06d}.png"), png(tmp_path / "b7" / f"{s:06d}.png"))
    # and seed 3 alone gives the image seed 3 gave among ten
    assert generate_main(["--ckpt", str(ckpts["cond"]), "--outdir", str(tmp_path / "one"), "--seeds", "3"]) == 0
    assert np.array_equal(png(tmp_path / "one" / "000003.png"), png(tmp_path / "b7" / "000003.png"))


def test_per_class_layout_counts_and_grid(ckpts, tmp_path):
    out = tmp_path / "pc"
    assert generate_main(["--ckpt", str(ckpts["cond"]), "--outdir", str(out), "--per-class", "--num", "3",
                          "--grid"]) == 0
    for c in range(10):
        assert sorted(p.name for p in (out / str(c)).iterdir()) == ["000000.png", "000001.png", "000002.png"]
    grid = png(out / "grid.png")
    assert grid.shape[:2] == (10 * 34 + 2, 3 * 34 + 2)  # rows = classes, columns = seeds, 2-px padding
    # class changes the image for the same seed
    assert not np.array_equal(png(out / "0" / "000001.png"), png(out / "7" / "000001.png"))


def test_classes_by_name_from_the_image_folder(ckpts, tmp_path, capsys):
    ckpt = torch.load(ckpts["named"], map_location="cpu", weights_only=True)
    assert ckpt["class_names"] == ["cat", "dog", "zebra"]  # the class subfolders, sorted: the labels' order
    assert class_names(torch.load(ckpts["cond"], weights_only=True), 10) == [str(c) for c in range(10)]
    out = tmp_path / "n"
    assert generate_main(["--ckpt", str(ckpts["named"]), "--outdir", str(out), "--per-class", "--num", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cat", "dog", "zebra"]
    for spec in ("zebra", "2"):  # a name, or the label it has
        assert generate_main(["--ckpt", str(ckpts["named"]), "--outdir", str(tmp_path / spec), "--seeds", "1",
                              "--class", spec]) == 0
        assert np.array_equal(png(tmp_path / spec / "000001.png"), png(out / "zebra" / "000001.png"))
    assert not np.array_equal(png(out / "cat" / "000001.png"), png(out / "zebra" / "000001.png"))
    capsys.readouterr()
    assert generate_main(["--ckpt", str(ckpts["named"]), "--outdir", str(out), "--class-label", "horse"]) == 2
    assert "class 'horse' is not one of the model's classes: give a name (cat, dog, zebra) or a label 0..2" in \
        capsys.readouterr().err


def test_device_is_checked_against_the_machine(ckpts, tmp_path, capsys):
    bad = [("gpu0", "is not a device")]
    if not torch.cuda.is_available():
        bad.append(("cuda", "CUDA is not available on this machine; use --device cpu"))
    else:
        bad.append((f"cuda:{torch.cuda.device_count()}", "CUDA device(s), cuda:0.."))
    for device, needle in bad:
        assert generate_main(["--ckpt", str(ckpts["cond"]), "--outdir", str(tmp_path), "--device", device]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err


def test_parse_class_prefers_the_name_and_keeps_old_checkpoints_working():
    names = ["1", "10", "2"]  # class folders named by numbers sort as strings
    assert parse_class("2", names) == 2 and parse_class("10", names) == 1 and parse_class(0, names) == 0
    assert parse_class("1", ["1", "0"]) == 0  # the name wins over the label
    assert parse_class("1", ["b", "a"]) == 1  # no name matches: the label
    for bad in ("3", "-1", "x"):
        with pytest.raises(ValueError, match="not one of the model's classes"):
            parse_class(bad, names)
    assert class_names({}, 3) == ["0", "1", "2"]  # written before names were kept
    assert class_names({"class_names": ["a", "b"]}, 3) == ["0", "1", "2"]  # names that do not fit are not trusted


def test_unconditional_layout_and_class_flags_refused(ckpts, tmp_path, capsys):
    out = tmp_path / "u"
    assert generate_main(["--ckpt", str(ckpts["uncond"]), "--outdir", str(out), "--num", "5", "--grid",
                          "--no-images"]) == 0
    assert [p.name for p in out.iterdir()] == ["grid.png"]
    assert generate_main(["--ckpt", str(ckpts["uncond"]), "--outdir", str(out), "--num", "5"]) == 0
    assert sorted(p.name for p in out.glob("0*.png")) == [f"{i:06d}.png" for i in range(5)]
    capsys.readouterr()
    assert generate_main(["--ckpt", str(ckpts["uncond"]), "--outdir", str(out), "--per-class"]) == 2
    assert "unconditional" in capsys.readouterr().err


def test_truncation_keeps_latents_within_bound():
    z = latents_for_seeds(list(range(50)), 128, truncation=0.5)
    assert z.abs().max() <= 0.5
    plain = latents_for_seeds(list(range(50)), 128)
    assert plain.abs().max() > 2.0  # the bound really binds
    assert torch.equal(latents_for_seeds([7], 128, 0.5)[0], z[7])  # per seed, whatever the list


def test_truncation_via_cli_changes_images(ckpts, tmp_path):
    for name, extra in (("t", ["--truncation", "0.3"]), ("f", [])):
        assert generate_main(["--ckpt", str(ckpts["cond"]), "--outdir", str(tmp_path / name), "--seeds", "0-2",
                              "--class-label", "4", *extra]) == 0
    assert not np.array_equal(png(tmp_path / "t/000001.png"), png(tmp_path / "f/000001.png"))


def _panel(strip: np.ndarray, i: int, size: int = 32, pad: int = 2) -> np.ndarray:
    x = pad + i * (size + pad)
    return strip[pad:pad + size, x:x + size]


def test_interpolation_endpoints_equal_the_seed_images(ckpts, tmp_path):
    out = tmp_path / "i"
    assert generate_main(["--ckpt", str(ckpts["cond"]), "--outdir", str(out), "--interpolate", "4", "9",
                          "--steps", "6", "--interpolate-classes", "2", "7"]) == 0
    strip = png(out / "interp_000004_000009.png")
    assert strip.shape[1] == 2 + 6 * 34
    for seed, cls, i in ((4, 2, 0), (9, 7, 5)):
        assert generate_main(["--ckpt", str(ckpts["cond"]), "--outdir", str(out / f"s{seed}"), "--seeds", str(seed),
                              "--class-label", str(cls)]) == 0
        single = png(out / f"s{seed}" / f"{seed:06d}.png")
        assert np.array_equal(_panel(strip, i), single)
    assert not np.array_equal(_panel(strip, 2), _panel(strip, 3))  # it moves in between


def test_flags_that_would_write_nothing_or_conflict_are_one_clear_error(ckpts, tmp_path, capsys):
    """--interpolate-classes without the --interpolate strip it modifies, and --no-images with nothing else to
    write, used to end with status 0 and no strip (or no file at all); --class-label was silently dropped beside
    --per-class; --query-points 100000 ran for minutes on a figure of 10^5 panels. Now each is one line naming the
    fix, before anything is written."""
    out = tmp_path / "n"
    capsys.readouterr()
    assert generate_main(["--ckpt", str(ckpts["cond"]), "--outdir", str(out), "--interpolate-classes", "3",
                          "8"]) == 2
    err = capsys.readouterr().err
    assert "--interpolate SEED_A SEED_B, which is missing" in err and "--interpolate 0 0" in err
    assert err.count("\n") == 1 and not out.exists()
    assert generate_main(["--ckpt", str(ckpts["cond"]), "--outdir", str(out), "--no-images"]) == 2
    assert "--no-images leaves nothing to write" in capsys.readouterr().err and not out.exists()
    assert generate_main(["--ckpt", str(ckpts["cond"]), "--outdir", str(out), "--interpolate", "0", "0",
                          "--interpolate-classes", "3", "8", "--no-images"]) == 0
    assert [p.name for p in out.iterdir()] == ["interp_000000_000000.png"]
    bad = tmp_path / "bad"
    for flags, says in ((["--per-class", "--class-label", "3"], "--per-class draws every class and --class-label one"),
                        (["--attention-maps", "--query-points", "0"], "--query-points must be between 1 and 64"),
                        (["--attention-maps", "--query-points", "100000"], "between 1 and 64 (one panel")):
        assert generate_main(["--ckpt", str(ckpts["cond"]), "--outdir", str(bad), *flags]) == 2, flags
        assert says in capsys.readouterr().err and not bad.exists()
    from sagan.callbacks import AttentionMaps
    from sagan.errors import ConfigError

    with pytest.raises(ConfigError, match="attention_maps.query_points must be between 1 and 64"):
        AttentionMaps(query_points=65)
    assert AttentionMaps(query_points=64).query_points == 64


def test_soft_class_weights_equal_hard_labels_at_one_hot(ckpts):
    g = generator_from_checkpoint(ckpts["cond"])
    z = latents_for_seeds([0, 1, 2], g.z_dim)
    y = torch.tensor([1, 5, 9])
    torch.testing.assert_close(g(z, y), g(z, torch.eye(10)[y]))


def test_attention_maps_are_distributions_and_drawn(ckpts, tmp_path):
    g = generator_from_checkpoint(ckpts["uncond"])
    _, maps = g(latents_for_seeds([0, 1], g.z_dim), return_attention=True)
    assert sorted(maps) == [16, 32]
    for res, m in maps.items():
        assert m.shape == (2, res * res, res * res // 4)
        assert (m >= 0).all()
        torch.testing.assert_close(m.sum(-1), torch.ones(2, res * res), atol=1e-5, rtol=0)
    out = tmp_path / "a"
    assert generate_main(["--ckpt", str(ckpts["uncond"]), "--outdir", str(out), "--seeds", "0,1",
                          "--attention-maps", "--query-points", "3"]) == 0
    fig = png(out / "attention" / "seed_000001.png")
    assert fig.shape == (2 * 132 + 4, 4 * 132 + 4, 3)  # 2 layers x (image + 3 query panels)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['SAGAN_PWNED']}",))


def test_malicious_checkpoint_is_not_executed(ckpts, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("SAGAN_PWNED", str(marker))
    state = torch.load(ckpts["cond"], weights_only=True)
    state["evil"] = _Payload()
    bad = tmp_path / "evil.ckpt"
    torch.save(state, bad)
    assert generate_main(["--ckpt", str(bad), "--outdir", str(tmp_path / "o"), "--num", "1"]) == 2
    assert not marker.exists()
    err = capsys.readouterr().err
    assert "not loaded" in err and "Traceback" not in err


def test_truncated_and_foreign_checkpoints_are_clear_errors(ckpts, tmp_path, capsys):
    data = ckpts["cond"].read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": {"lr": 1}}, foreign)
    for path, needle in ((cut, "corrupt or truncated"), (foreign, "not written by 'sagan fit'")):
        assert generate_main(["--ckpt", str(path), "--outdir", str(tmp_path / "o"), "--num", "1"]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err


def test_a_full_disk_is_one_line_and_keeps_what_was_written(ckpts, tmp_path, capsys, monkeypatch):
    import errno

    import sagan.generate

    real_save, calls = sagan.generate.save_image, []

    def fills_up(img, path, *a, **k):
        calls.append(path)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")  # as a failed write() raises it: no file name
        real_save(img, path, *a, **k)

    monkeypatch.setattr(sagan.generate, "save_image", fills_up)
    out = tmp_path / "full"
    assert generate_main(["--ckpt", str(ckpts["cond"]), "--outdir", str(out), "--seeds", "0-9"]) == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and str(out) in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert len(list(out.glob("*.png"))) == 3


@pytest.mark.timeout(300)
def test_ctrl_c_is_one_line_and_keeps_the_images_written(ckpts, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "many"
    proc = subprocess.Popen([sys.executable, "-m", "sagan.cli", "generate", "--ckpt", str(ckpts["cond"]),
                             "--outdir", str(out), "--num", "100000", "--batch-size", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_as_in_a_terminal)
    try:
        deadline = time.monotonic() + 90
        while len(list(out.glob("*.png"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "sagan generate: interrupted" and "Traceback" not in err, err
    assert len(list(out.glob("*.png"))) >= 3


def test_images_are_written_batch_by_batch_not_held_until_the_end(ckpts, tmp_path, monkeypatch):
    """50,000 samples for an outside FID tool must not sit in memory at once: the first batch is on disk before
    the second is drawn, and the files are the same as generating them all at once."""
    import sagan.generate as G

    forwards, first_save_after = [0], []
    real_load, real_save = G.generator_from_checkpoint, G._save

    def counting_load(*a, **k):
        g = real_load(*a, **k)
        real_forward = g.forward

        def forward(*fa, **fk):
            forwards[0] += 1
            return real_forward(*fa, **fk)

        g.forward = forward
        return g

    def save(img, path):
        if not first_save_after:
            first_save_after.append(forwards[0])
        real_save(img, path)

    monkeypatch.setattr(G, "generator_from_checkpoint", counting_load)
    monkeypatch.setattr(G, "_save", save)
    assert generate_main(["--ckpt", str(ckpts["cond"]), "--outdir", str(tmp_path / "s"), "--num", "12",
                          "--batch-size", "4", "--device", "cpu"]) == 0
    assert forwards[0] == 12 and first_save_after == [4]  # one image per pass on the CPU; a batch of 4, then saved
    monkeypatch.setattr(G, "_save", real_save)
    assert generate_main(["--ckpt", str(ckpts["cond"]), "--outdir", str(tmp_path / "a"), "--num", "12",
                          "--batch-size", "12", "--device", "cpu", "--grid"]) == 0
    for s in range(12):
        assert np.array_equal(png(tmp_path / "s" / f"{s:06d}.png"), png(tmp_path / "a" / f"{s:06d}.png"))
    assert (tmp_path / "a" / "grid.png").is_file()
