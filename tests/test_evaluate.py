"""`sagan evaluate` and in-loop FID, end to end on tiny digits runs."""

import csv
import json
import re
from unittest import mock

import numpy as np
import pytest
import torch

from sagan.evaluate import main as evaluate_main

from conftest import REPO, TINY, write_images, run_cli


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A tiny digits run with in-loop FID (digits-mlp features) every 2 iterations."""
    root = tmp_path_factory.mktemp("runs")
    cache = root / "cache"
    args = ["fit", "--config", str(REPO / "configs/digits.yaml"), "--output_root", str(root), "--experiment", "d",
            *TINY, "--data.batch_size", "16", "--trainer.max_steps", "8", "--samples.every_n_steps", "0",
            "--fid.every_n_steps", "2", "--fid.num_samples", "100", "--fid.metrics", "[fid, kid]",
            "--fid.cache_root", str(cache), "--trainer.logger", "CSVLogger",
            "--trainer.logger.save_dir", str(root / "d")]
    assert run_cli(args) == 0
    return root / "d", cache


def test_in_loop_fid_is_logged_and_best_checkpoint_kept(digits_run):
    run, cache = digits_run
    rows = list(csv.DictReader(open(next(run.rglob("metrics.csv")))))
    fids = [float(r["val/fid"]) for r in rows if r.get("val/fid")]
    assert len(fids) == 2  # iterations 2 and 4
    assert all(f > 0 for f in fids)
    assert any(r.get("val/kid") for r in rows)
    best = run / "checkpoints" / "best.ckpt"
    assert best.is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    state = torch.load(best, weights_only=True)
    cb = [v for k, v in state["callbacks"].items() if k.startswith("FIDEvaluation")][0]
    assert cb["best_fid"] == pytest.approx(min(fids))
    assert len(list(cache.glob("*.pt"))) >= 1  # reference statistics cached on disk


def test_in_loop_fid_and_the_floor_on_an_image_folder(tmp_path, capsys, monkeypatch):
    """The image-folder configs leave data.num_workers unset (automatic); the in-loop reference pass passed that
    None to its DataLoader and every such fit with FID on ended at its start. `sagan evaluate --floor` on a folder
    (no held-out split) was an error after all the work; it now splits the images in two halves."""
    for cls in ("cat", "dog"):
        write_images(tmp_path / "pets" / cls, 70, size=32, seed=len(cls))
    args = ["fit", "--config", str(REPO / "configs/folder32.yaml"), "--data.root", str(tmp_path / "pets"),
            "--output_root", "runs", "--experiment", "f", *TINY, "--data.batch_size", "8",
            "--trainer.max_steps", "4", "--samples.every_n_steps", "0", "--fid.every_n_steps", "2",
            "--fid.num_samples", "64", "--fid.feature_extractor", "digits-mlp", "--fid.cache_root", str(tmp_path)]
    monkeypatch.chdir(tmp_path)  # a relative output root: the summary still names the best checkpoint's full path
    assert run_cli(args) == 0
    out = capsys.readouterr().out
    assert "[iteration 2] val/fid=" in out
    assert re.search(r"best FID: .* at iteration [24] \(" + re.escape(str(tmp_path / "runs/f/checkpoints/best.ckpt"))
                     + r"\)\n", out), out
    # a folder has no held-out split: --floor scores one random half of it against the other, and the model too
    ckpt = str(tmp_path / "runs" / "f" / "checkpoints" / "last.ckpt")
    assert evaluate_main(["--ckpt", ckpt, "--floor", "--feature-extractor", "digits-mlp", "--num-samples", "64",
                          "--cache-root", str(tmp_path), "--json", str(tmp_path / "f.json")]) == 0
    assert "FID = " in capsys.readouterr().out
    out = json.loads((tmp_path / "f.json").read_text())
    assert out["floor"]["num_images"] == out["protocol"]["num_reference"] == 70
    assert "random half" in out["protocol"]["reference"]["split"]
    from sagan.data import SAGANData
    from sagan.evaluate import _split_halves

    dm = SAGANData("folder", root=str(tmp_path / "pets"), resolution=32)
    ds = dm.build_dataset()
    first, second = _split_halves(ds, dm.labels(), seed=0)
    assert not set(first.indices) & set(second.indices) and len(first) + len(second) == len(ds)

    # halves too small for 64-d features: refused before the reference is read or a sample drawn
    for cls in ("cat", "dog"):
        write_images(tmp_path / "few" / cls, 30, size=32, seed=len(cls))
    with mock.patch("sagan.metrics.Evaluator.load_reference", side_effect=AssertionError("read the reference")):
        assert evaluate_main(["--ckpt", ckpt, "--floor", "--feature-extractor", "digits-mlp", "--num-samples", "64",
                              "--data-root", str(tmp_path / "few"), "--cache-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs at least 64 images per set, but the reference (train, a random half (seed 0)) set has 30" in err
    assert "Traceback" not in err
    assert [ds.samples[i][1] for i in first.indices].count(0) == 35  # each class split in half
    assert _split_halves(ds, dm.labels(), seed=1)[0].indices != first.indices

    # the training images moved (another machine): the fix is named before the generator is loaded
    (tmp_path / "pets").rename(tmp_path / "pets-moved")
    for extra, said in (([], "data.root '" + str(tmp_path / "pets") + "', is not on this machine: pass --data-root"),
                        (["--data-root", str(tmp_path / "gone")], f"--data-root '{tmp_path / 'gone'}' does not exist")):
        assert evaluate_main(["--ckpt", ckpt, "--feature-extractor", "digits-mlp", "--num-samples", "64", *extra]) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, err

def test_in_loop_line_names_the_least_varied_classes(tmp_path, capsys):
    """The console line of each in-loop evaluation ends with the three classes of lowest spread, lowest first; the
    first of them is the class whose spread is val/spread_min."""
    args = ["fit", "--config", str(REPO / "configs/digits.yaml"), "--output_root", str(tmp_path), "--experiment", "d",
            *TINY, "--data.batch_size", "16", "--trainer.max_steps", "8", "--samples.every_n_steps", "0",
            "--fid.every_n_steps", "2", "--fid.num_samples", "100", "--fid.metrics", "[fid]",
            "--fid.cache_root", str(tmp_path / "cache")]
    assert run_cli(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[iteration ")]
    assert len(lines) == 2
    for line in lines:
        spread_min = float(line.split("val/spread_min=")[1].split()[0])
        low = line.split("least varied: ")[1].split(", ")
        assert len(low) == 3 and all(name in [str(c) for c in range(10)] for name, _ in map(str.split, low))
        values = [float(v) for _, v in map(str.split, low)]
        assert values == sorted(values) and values[0] == pytest.approx(spread_min, abs=0.005)


def test_evaluate_checkpoint_prints_table_and_writes_protocol(digits_run, capsys, tmp_path):
    run, cache = digits_run
    ckpt = run / "checkpoints" / "last.ckpt"
    code = evaluate_main(["--ckpt", str(ckpt), "--num-samples", "100", "--metrics", "fid,isc,prc", "--floor",
                          "--cache-root", str(cache), "--device", "cpu"])
    assert code == 0
    out = capsys.readouterr().out
    assert "generated (EMA)" in out and "real test (floor)" in out and "fid" in out and "recall" in out
    assert "x the floor" in out
    data = json.loads(ckpt.with_suffix(".metrics.json").read_text())
    p = data["protocol"]
    assert p["num_generated"] == 100 and p["num_reference"] == 1437
    assert p["reference"]["split"] == "train" and p["feature_extractor"] == "digits-mlp"
    assert len(p["feature_extractor_weights_sha256"]) == 16 and p["seed"] == 0 and p["iteration"] == 4
    # the floor: the 360 held-out real digits against the 1,437 training digits (not the training set against
    # itself, which would give 0, nor generated images): small but not zero, as varied as the data, most recalled
    floor = data["floor"]["metrics"]
    assert data["floor"]["num_images"] == 360 and data["floor"]["split"] == "test"
    assert 0.2 < floor["fid"] < 3.0 and floor["fid"] < data["metrics"]["fid"] / 5
    assert 0.8 < floor["spread"] < 1.25 and floor["recall"] > 0.8
    for part in (data["metrics"], data["floor"]["metrics"]):  # precision, recall, spread and bins land in the JSON
        assert {"precision", "recall", "spread", "spread_min", "ndb", "jsd"} <= part.keys()
    assert floor["ndb"] <= 0.15 and floor["jsd"] < 0.02  # real held-out digits fill the bins as the data does
    assert p["prc_neighborhood"] == 3 and p["spread_layer"] == "64" and p["ndb_bins"] == 20
    # the spread of each class by name: its mean and minimum are the table's, the three lowest are printed
    per = data["spread_per_class"]
    assert list(per) == [str(c) for c in range(10)]
    assert np.mean(list(per.values())) == pytest.approx(data["metrics"]["spread"])
    assert min(per.values()) == pytest.approx(data["metrics"]["spread_min"])
    low = sorted(per, key=per.get)[:3]
    assert f"least varied classes (spread, generated over real): {low[0]} {per[low[0]]:.2f}, {low[1]} " in out


def test_a_json_that_cannot_be_written_keeps_the_printed_result(digits_run, capsys, tmp_path):
    """Beside a checkpoint in a read-only or shared folder the JSON cannot be written: the table is the result, one
    line says so, exit 0; a --json path that cannot be written is an error. Real failures, no mocks: a folder
    where the JSON should go, a file where its folder should be. No partial file is left."""
    run, cache = digits_run
    ckpt = tmp_path / "shared" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    ckpt.with_suffix(".metrics.json").mkdir()  # os.replace onto it fails
    args = ["--ckpt", str(ckpt), "--num-samples", "100", "--metrics", "fid", "--cache-root", str(cache),
            "--device", "cpu"]
    capsys.readouterr()
    assert evaluate_main(args) == 0
    out = capsys.readouterr()
    assert "fid" in out.out and "could not write" in out.err and "--json PATH" in out.err, out.err
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["last.ckpt", "last.metrics.json"]
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    assert evaluate_main([*args, "--json", str(blocker / "m.json")]) == 2
    err = capsys.readouterr().err
    assert "error: could not write" in err and "m.json" in err and "Traceback" not in err, err


def test_floor_is_also_compared_at_its_own_sample_count(digits_run, capsys):
    """More generated samples than held-out images: a second row scores the generator on as many samples as the
    floor has (FID and k-NN recall both depend on the count), the mean of MATCHED_DRAWS different draws."""
    from sagan.evaluate import MATCHED_DRAWS, _matched_draws

    run, cache = digits_run
    ckpt = run / "checkpoints" / "last.ckpt"
    code = evaluate_main(["--ckpt", str(ckpt), "--num-samples", "400", "--metrics", "fid,prc", "--floor",
                          "--cache-root", str(cache), "--device", "cpu", "--json", str(run / "m.json")])
    assert code == 0
    out = capsys.readouterr().out
    assert f"generated, 360 (x{MATCHED_DRAWS})" in out and "at the floor's sample count (360 generated" in out
    same = json.loads((run / "m.json").read_text())["floor"]["generated_same_count"]
    assert same["num_generated"] == 360 and same["draws"] == MATCHED_DRAWS
    assert {"fid", "precision", "recall", "spread"} <= same["metrics"].keys()

    calls = []

    class Ev:  # records the draws and gives each a different value
        def generator(self, g, n, seed):
            calls.append((n, seed))
            return type("R", (), {"values": {"fid": float(seed), "recall": 1.0}})()

    m = _matched_draws(Ev(), None, 360, seed=7)
    assert calls == [(360, 7 + i) for i in range(MATCHED_DRAWS)]
    assert m == {"fid": sum(7 + i for i in range(MATCHED_DRAWS)) / MATCHED_DRAWS, "recall": 1.0}


def test_label_protocol_script_compares_both_protocols(digits_run):
    import importlib.util

    spec = importlib.util.spec_from_file_location("label_protocol", REPO / "scripts/label_protocol.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    run, _ = digits_run
    lines = script.main([str(run / "checkpoints" / "last.ckpt"), "--seeds", "2", "--num-samples", "100"])
    assert lines[0].startswith("reference class counts: [142, 146")  # the 1,437 training digits by class
    rows = [line for line in lines if line.startswith("| uniform") or line.startswith("| class")]
    assert len(rows) == 2 and rows[0] != rows[1]
    single = rows
    from sagan import metrics as M
    assert M.generated_labels.__name__ == "generated_labels"  # the protocol is put back

    # several checkpoints, one row each, against the held-out floor; accuracy for the digits
    ckpts = [str(run / "checkpoints" / n) for n in ("last.ckpt", "best.ckpt")]
    lines = script.main([*ckpts, "--per-checkpoint", "--num-samples", "100"])
    assert lines[0].startswith("floor (test split against train): FID ")
    rows = [line for line in lines if line.startswith(f"| {run}")]
    assert [r.split(" | ")[0][2:] for r in rows] == ckpts
    cells = [c.strip() for c in rows[0].strip("| ").split("|")]
    assert len(cells) == 6 and cells[1].endswith("x") and cells[5].endswith("%")
    fid_floor = float(lines[0].split("FID ")[1].split(",")[0])
    fid_now_seed0 = float(single[1].split("|")[2])  # the one-checkpoint mode's class-frequency FID, seed 0
    # the ratio is printed to 2 decimals and the floor to 4, so the floor read back carries a relative error of up
    # to 0.00005 / fid_floor into the expected ratio (0.012 at the ratio 180 of a barely trained model)
    expected = fid_now_seed0 / fid_floor
    assert float(cells[2][:-1]) == pytest.approx(expected, abs=0.0051 + expected * 0.00006 / fid_floor)
    assert M.generated_labels.__name__ == "generated_labels"
    with pytest.raises(SystemExit):
        script.main(ckpts)  # several checkpoints without --per-checkpoint: a usage error


def test_evaluate_bad_inputs_one_clear_message_each(digits_run, capsys, tmp_path):
    run, cache = digits_run
    ckpt = run / "checkpoints" / "last.ckpt"
    cases = {
        "positive integer": ["--ckpt", str(ckpt), "--num-samples", "0"],
        "at least 64 images": ["--ckpt", str(ckpt), "--num-samples", "10", "--cache-root", str(cache)],
        "does not exist": ["--ckpt", str(tmp_path / "missing.ckpt")],
        "weights-inception-2015-12-05": ["--ckpt", str(ckpt), "--feature-extractor", "inception-v3-compat",
                                         "--weights", str(tmp_path / "nope.pth")],
        "is not a device": ["--ckpt", str(ckpt), "--device", "gpu0"],
        "--batch-size must be >= 1": ["--ckpt", str(ckpt), "--batch-size", "0"],
        "--num-workers must be >= 0": ["--ckpt", str(ckpt), "--num-workers", "-1"],
        "feature layer '99' is not one that digits-mlp provides: choose one of 64, logits_unbiased": [
            "--ckpt", str(ckpt), "--fid-layer", "99", "--cache-root", str(cache)],
        **({} if torch.cuda.is_available() else {"CUDA is not available on this machine": ["--ckpt", str(ckpt),
                                                                                           "--device", "cuda"]}),
        # a mistyped folder is named first, before the (here missing) Inception weights are looked for
        f"image folder '{tmp_path / 'typo'}' does not exist": ["--folders", str(tmp_path / "typo"), str(run),
                                                               "--weights", str(tmp_path / "nope.pth")],
    }
    for needle, args in cases.items():
        assert evaluate_main(args) == 2, needle
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and err.count("\n") == 1, err

    # a checkpoint of another architecture: its weights do not fit the generator its hyper-parameters describe
    state = torch.load(ckpt, weights_only=True)
    state["hyper_parameters"]["g_ch"] = 16
    other = tmp_path / "other.ckpt"
    torch.save(state, other)
    assert evaluate_main(["--ckpt", str(other)]) == 2
    err = capsys.readouterr().err
    assert "do not match" in err and "Traceback" not in err
    # and a file that is no checkpoint at all
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    assert evaluate_main(["--ckpt", str(junk)]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err


def test_evaluate_two_folders(tmp_path, capsys):
    write_images(tmp_path / "a", 70, size=32, seed=1)
    write_images(tmp_path / "b", 70, size=32, seed=2)
    out_json = tmp_path / "ab.json"
    code = evaluate_main(["--folders", str(tmp_path / "a"), str(tmp_path / "b"), "--feature-extractor", "digits-mlp",
                          "--metrics", "fid", "--json", str(out_json), "--device", "cpu"])
    assert code == 0
    data = json.loads(out_json.read_text())
    assert data["metrics"]["fid"] >= 0 and data["protocol"]["num_input1"] == 70


def test_folders_are_read_like_training_data_at_one_resolution(tmp_path, capsys):
    """Folders of mixed sizes and formats (a scraped set; a generator's samples beside real photos), with the
    __MACOSX junk a zip made on a Mac unpacks with and a NAS's thumbnail folders, compare at one resolution; an
    unreadable file is named."""
    from PIL import Image

    write_images(tmp_path / "a" / "x", 40, size=48, seed=1)
    write_images(tmp_path / "a" / "y", 30, size=32, seed=2)
    (tmp_path / "a" / "__MACOSX").mkdir()
    (tmp_path / "a" / "__MACOSX" / "._img_000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    write_images(tmp_path / "a" / "x" / "@eaDir", 3, size=8)  # a NAS's thumbnails: not images of the set
    for i, p in enumerate(write_images(tmp_path / "b", 70, size=40, seed=3)):
        if i % 2:  # half of them webp, one 16-bit grayscale, one transparent
            Image.open(p).save(p.with_suffix(".webp"), lossless=True)
            p.unlink()
    Image.fromarray(np.full((36, 50), 40000, np.uint16)).save(tmp_path / "b" / "deep.png")
    Image.new("RGBA", (30, 44), (255, 0, 0, 128)).save(tmp_path / "b" / "alpha.png")
    out_json = tmp_path / "ab.json"
    args = ["--folders", str(tmp_path / "a"), str(tmp_path / "b"), "--feature-extractor", "digits-mlp",
            "--metrics", "fid", "--device", "cpu"]
    assert evaluate_main([*args, "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "protocol: 70 vs 72 images, both at 48x48" in out  # the first folder's first image's short side
    protocol = json.loads(out_json.read_text())["protocol"]
    assert protocol["resolution"] == 48 and (protocol["num_input1"], protocol["num_input2"]) == (70, 72)
    fid = json.loads(out_json.read_text())["metrics"]["fid"]
    import zipfile

    with zipfile.ZipFile(tmp_path / "b.zip", "w") as z:  # the same images in a zip archive: the same FID
        for p in (tmp_path / "b").iterdir():
            z.write(p, f"b/{p.name}")
    assert evaluate_main([*args[:2], str(tmp_path / "b.zip"), *args[3:], "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["metrics"]["fid"] == fid
    assert evaluate_main([*args, "--resolution", "16", "--json", str(out_json)]) == 0
    assert "both at 16x16" in capsys.readouterr().out and json.loads(out_json.read_text())["protocol"][
        "resolution"] == 16

    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cases = {"broken.png": args,
             "--resolution must be >= 1": [*args, "--resolution", "0"],
             "--resolution is for --folders": ["--ckpt", str(tmp_path / "x.ckpt"), "--resolution", "32"]}
    for needle, case in cases.items():
        assert evaluate_main(case) == 2, needle
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and "bad_images" not in err, err


def test_imbalanced_digits_script_writes_the_long_tail_and_scores_against_it(digits_run, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("imbalanced_digits", REPO / "scripts/imbalanced_digits.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    counts = script.main(["make", str(tmp_path / "lt"), "--imbalance", "10"])
    assert counts == [142, 113, 85, 68, 52, 40, 31, 24, 18, 14]  # class 0 whole, class 9 a tenth of its 139
    assert [len(list((tmp_path / "lt" / str(c)).glob("*.png"))) for c in range(10)] == counts
    step = script.main(["make", str(tmp_path / "step"), "--imbalance", "5", "--profile", "step"])
    assert step == [142, 146, 142, 146, 145, 29, 29, 29, 28, 29]  # classes 5-9 keep a fifth
    run, _ = digits_run
    ckpt = str(run / "checkpoints" / "last.ckpt")
    lines = script.main(["score", str(tmp_path / "lt"), ckpt, "--num-samples", "100"])
    assert lines[0].endswith(f"({counts} images by class)")
    assert lines[1].endswith("| accuracy 7,8,9 |")  # the three rarest classes
    cells = [float(c) for c in lines[3].strip("| ").split(" | ")[1:]]
    assert len(cells) == 6 and cells[0] > 0 and all(0 <= c <= 1 for c in (cells[1], cells[2], cells[4], cells[5]))
