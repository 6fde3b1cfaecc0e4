"""scripts/photo_experiment.py: the per-class spread it reports, and one end-to-end run on a tiny class folder."""

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


def test_script_scores_a_checkpoint_and_prints_each_class_spread(tmp_path):
    data = tmp_path / "patches"
    for split, n in (("train", 12), ("test", 6)):
        write_images(data / split / "cat", n, size=32, seed=1)
        write_images(data / split / "dog", n, size=32, seed=2)
    args = ["fit", "--config", str(REPO / "configs/folder32.yaml"), "--output_root", str(tmp_path),
            "--data.root", str(data / "train"), "--data.batch_size", "4", "--data.num_workers", "0",
            "--trainer.max_steps", "2", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--attention_maps.every_n_steps", "0", "--samples.every_n_steps", "0"]
    assert run_cli(args) == 0
    ckpt = tmp_path / "folder32" / "checkpoints" / "last.ckpt"
    out = subprocess.run([sys.executable, str(REPO / "scripts/photo_experiment.py"), "--data", str(data),
                          "--ckpt", str(ckpt), "--per-class", "6", "--class-spread"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith(f"| {ckpt} | ") and line.count("|") == 8 for line in lines)  # FID .. accuracy
    header = next(i for i, line in enumerate(lines) if line.startswith("| model | cat | dog |"))
    rows = {line.split(" | ")[0][2:]: line for line in lines[header + 2:] if line.startswith("| ")}
    assert set(rows) == {"real held-out (floor)", str(ckpt)}
    assert all(float(v) > 0 for v in rows[str(ckpt)].strip(" |").split(" | ")[1:])
