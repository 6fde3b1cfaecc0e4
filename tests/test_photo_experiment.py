"""scripts/photo_experiment.py: the per-class spread and effective classes it reports, and end-to-end runs on a tiny
class folder, conditional and unconditional."""

import subprocess
import sys

import torch

from conftest import REPO, run_cli, write_images

sys.path.insert(0, str(REPO / "scripts"))
import photo_experiment  # noqa: E402


def test_spread_sees_a_collapsed_class_and_only_that_one():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 16, generator=g)
    y = torch.arange(2).repeat(100)
    real_spread = photo_experiment.spread(real, y, 2)
    fake = torch.randn(200, 16, generator=g)
    fake[y == 0] = fake[y == 0][:1] + 1e-3 * fake[y == 0]  # class 0: one point for every latent
    sp = photo_experiment.spread(fake, y, 2) / real_spread
    assert sp[0] < 0.01
    assert 0.9 < sp[1] < 1.1


def test_effective_classes_counts_what_the_predictions_cover():
    assert photo_experiment.effective_classes(torch.arange(4).repeat(25), 4) == 4.0
    assert abs(photo_experiment.effective_classes(torch.zeros(100, dtype=torch.long), 4) - 1.0) < 1e-9
    two = photo_experiment.effective_classes(torch.tensor([0, 1] * 50), 4)
    assert abs(two - 2.0) < 1e-9


def _patches(tmp_path):
    data = tmp_path / "patches"
    for split, n in (("train", 12), ("test", 6)):
        write_images(data / split / "cat", n, size=32, seed=1)
        write_images(data / split / "dog", n, size=32, seed=2)
    return data


def _fit_and_score(tmp_path, data, train_root, name):
    args = ["fit", "--config", str(REPO / "configs/folder32.yaml"), "--output_root", str(tmp_path),
            "--experiment", name, "--data.root", str(train_root), "--data.batch_size", "4",
            "--data.num_workers", "0", "--trainer.max_steps", "2", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--attention_maps.every_n_steps", "0",
            "--samples.every_n_steps", "0"]
    assert run_cli(args) == 0
    ckpt = tmp_path / name / "checkpoints" / "last.ckpt"
    out = subprocess.run([sys.executable, str(REPO / "scripts/photo_experiment.py"), "--data", str(data),
                          "--ckpt", str(ckpt), "--per-class", "6", "--class-spread", "--histogram"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    row = next(line for line in lines if line.startswith(f"| {ckpt} | "))
    assert row.count("|") == 11  # FID .. effective classes, NDB, JSD
    header = next(i for i, line in enumerate(lines) if line.startswith("| model | cat | dog |"))
    rows = {}
    for line in lines[header + 2:]:
        if not line.startswith("| "):
            break
        rows[line.split(" | ")[0][2:]] = line
    assert set(rows) == {"real held-out (floor)", str(ckpt)}
    cells = row.strip(" |").split(" | ")[1:]
    hist_at = next(i for i, line in enumerate(lines) if line.startswith("| model (samples per predicted class) | cat | dog |"))
    hist = {line.split(" | ")[0][2:]: [int(v) for v in line.strip(" |").split(" | ")[1:]]
            for line in lines[hist_at + 2:] if line.startswith("| ")}
    assert set(hist) == {"real held-out (floor)", str(ckpt)}
    for counts in hist.values():  # every sample once; the effective classes are the histogram's exp(entropy)
        assert sum(counts) == 12 and len(counts) == 2
    p = torch.tensor(hist[str(ckpt)], dtype=torch.float64) / 12
    p = p[p > 0]
    assert abs(float(torch.exp(-(p * p.log()).sum())) - float(cells[6])) < 0.01
    for r in (row, next(line for line in lines if line.startswith("| real held-out (floor) | "))):
        ndb, jsd = (float(v) for v in r.strip(" |").split(" | ")[-2:])  # the label-free bins: two of them here
        assert ndb in (0.0, 0.5, 1.0) and 0.0 <= jsd <= 0.6932
    return cells, rows[str(ckpt)].strip(" |").split(" | ")[1:]


def test_script_scores_a_checkpoint_and_prints_each_class_spread(tmp_path):
    data = _patches(tmp_path)
    cells, spreads = _fit_and_score(tmp_path, data, data / "train", "cond")
    assert all(float(v) > 0 for v in spreads)
    assert 0.0 <= float(cells[5]) <= 1.0  # accuracy on the classes asked for
    assert 1.0 <= float(cells[6]) <= 2.0  # effective classes of two


def test_script_scores_an_unconditional_checkpoint_by_predicted_class(tmp_path):
    data = _patches(tmp_path)
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in (data / "train").glob("*/*.png"):
        (flat / f"{f.parent.name}_{f.name}").write_bytes(f.read_bytes())
    cells, spreads = _fit_and_score(tmp_path, data, flat, "uncond")
    assert cells[5] == "-"  # no class was asked for
    assert 1.0 <= float(cells[6]) <= 2.0
    assert all(v == "-" or float(v) > 0 for v in spreads)
