"""W&B dashboards: a few offline training steps, then the offline run file is read back."""


import pytest

from sagan.cli import wandb_configured

from conftest import REPO, TINY, run_cli
from wandb_reader import read_run

PROMISED = {
    "train/loss_d", "train/loss_g", "train/d_real", "train/d_fake", "train/grad_norm_g", "train/grad_norm_d",
    "train/lr_g", "train/lr_d", "train/images_per_s", "train/iteration",
    "attention/gamma_G16", "attention/gamma_D16",
    "val/fid", "val/kid", "val/isc", "val/fid_best", "val/precision", "val/recall", "val/spread", "val/spread_min",
    "val/ndb", "val/jsd",
}




@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    assert TINY[-2:] == ["--trainer.logger", "false"]
    root = tmp_path_factory.mktemp("wb")
    args = ["fit", "--config", str(REPO / "configs/digits.yaml"), "--output_root", str(root), "--experiment", "w",
            *TINY[:-2],  # all but "--trainer.logger false": keep the config's WandbLogger
            "--trainer.max_steps", "12", "--trainer.log_every_n_steps", "2", "--data.batch_size", "8",
            "--samples.every_n_steps", "3", "--attention_maps.every_n_steps", "3", "--fid.every_n_steps", "3",
            "--fid.num_samples", "100", "--fid.metrics", "[fid, kid, isc, prc]", "--fid.cache_root", str(root / "cache")]
    assert run_cli(args) == 0
    files = list((root / "w" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, "one offline run under outputs/<experiment>/wandb"
    return files[0]


def test_every_promised_key_is_logged(wandb_run):
    run = read_run(wandb_run)
    missing = PROMISED - run.keys
    assert not missing, f"missing keys: {sorted(missing)}"
    fids = [row["val/fid"] for row in run.history if "val/fid" in row]
    assert len(fids) == 2 and run.summary["val/fid"]["min"] == pytest.approx(min(fids))
    assert run.metrics["val/fid"]["summary"].startswith("min") and run.metrics["val/isc"]["summary"].startswith("max")
    assert run.metrics["val/recall"]["summary"].startswith("max") and run.metrics["val/spread"]["summary"].startswith("max")
    assert run.metrics["val/ndb"]["summary"].startswith("min") and run.metrics["val/jsd"]["summary"].startswith("min")
    recalls = [row["val/recall"] for row in run.history if "val/recall" in row]
    assert len(recalls) == 2 and all(0 <= r <= 1 for r in recalls)
    assert run.metrics["*"]["step_metric"] == "trainer/global_step"


def test_sample_grids_and_attention_maps_are_logged_as_images(wandb_run):
    run = read_run(wandb_run)
    images = {k.split("/_type")[0] for row in run.history for k, v in row.items()
              if k.endswith("/_type") and "images" in str(v)}
    assert {"samples/ema_grid", "attention_maps/G"} <= images
    media = list((wandb_run.parent / "files" / "media" / "images").rglob("*.png"))
    assert any("ema_grid" in p.name for p in media) and any(p.parent.name == "attention_maps" for p in media)


def test_resolved_config_and_code_version_are_recorded(wandb_run):
    run = read_run(wandb_run)
    assert run.config["git_commit"] and run.config["cli"]["model"]["g_ch"] == 8
    assert run.config["cli"]["experiment"] == "w"


def test_offline_unless_wandb_is_set_up(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not wandb_configured()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password x\n")
    assert wandb_configured()
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert wandb_configured()


def test_a_resume_continues_the_checkpoints_wandb_run_when_online(wandb_run, monkeypatch):
    """Every checkpoint records its W&B run's id; resuming from it online continues that run (same id,
    resume='allow'), from --ckpt_path last or a path. Offline (W&B cannot resume offline runs), a fresh run, an
    unreadable checkpoint and an id the user chose keep W&B's own behaviour."""
    import torch
    from jsonargparse import Namespace

    from sagan.cli import SAGANCLI

    run_dir = wandb_run.parents[2]
    run_id = wandb_run.stem.removeprefix("run-")
    folder = run_dir / "checkpoints"
    assert torch.load(folder / "last.ckpt", weights_only=True)["wandb_run_id"] == run_id
    periodic = sorted(folder.glob("step=*.ckpt"))[0]
    (run_dir / "broken.ckpt").write_bytes(b"not a checkpoint")

    def configure(ckpt_path, **chosen):
        init = {"save_dir": None, "name": None, "offline": False, "mode": None, "id": None, "version": None,
                "resume": None, **chosen}
        cfg = Namespace(trainer=Namespace(logger=Namespace(class_path="pytorch_lightning.loggers.WandbLogger",
                                                           init_args=Namespace(**init))),
                        output_root=str(run_dir.parent), experiment=run_dir.name, ckpt_path=ckpt_path)
        SAGANCLI._configure_wandb(cfg)
        args = cfg.trainer.logger.init_args
        return args.id, args.resume

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "k")  # W&B set up: online
    assert configure("last") == (run_id, "allow")
    assert configure(str(periodic)) == (run_id, "allow")
    assert configure(None) == (None, None)
    assert configure(str(run_dir / "broken.ckpt")) == (None, None)
    assert configure("last", id="mine") == ("mine", None)
    assert configure("last", offline=True) == (None, None)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert configure("last") == (None, None)


@pytest.mark.parametrize("offline", ["not set up", "asked for"])
def test_log_model_offline_keeps_checkpoints_as_artifacts_of_the_offline_run(tmp_path, monkeypatch, recwarn, offline):
    """--trainer.logger.log_model true where W&B is not set up (or offline is asked for): Lightning refused the
    pair (a traceback); the run logs offline with its checkpoints as artifacts that `wandb sync` uploads."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # W&B's staging copies of the artifacts
    ask = ["--trainer.logger.init_args.offline", "true"] if offline == "asked for" else []
    args = ["fit", "--config", str(REPO / "configs/digits.yaml"), "--output_root", str(tmp_path), "--experiment", "m",
            *TINY[:-2], "--trainer.max_steps", "4", "--data.batch_size", "8", "--samples.every_n_steps", "0",
            "--checkpoint.every_n_train_steps", "2", "--trainer.logger.init_args.log_model", "true", *ask]
    assert run_cli(args) == 0
    assert any("log_model: this run logs to W&B offline" in str(w.message) for w in recwarn)
    (run,) = (tmp_path / "m" / "wandb").glob("offline-run-*/run-*.wandb")
    assert f"model-{run.stem.removeprefix('run-')}".encode() in run.read_bytes()  # the checkpoint artifact


def test_an_unreachable_wandb_logs_offline_and_training_goes_on(tmp_path):
    """W&B set up (a key) on a machine that cannot reach it (a compute node without internet): W&B's error ended
    the fit at its start, after its retries, with a traceback; now the run logs offline, with one warning. A fresh
    process: W&B ignores changes to its environment once a session has started in this one."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    env.update(WANDB_API_KEY="0" * 40, WANDB_BASE_URL="http://127.0.0.1:9",  # nothing listens: refused at once
               WANDB_INIT_TIMEOUT="5", PYTHONDONTWRITEBYTECODE="1")
    args = ["fit", "--config", str(REPO / "configs/digits.yaml"), "--output_root", str(tmp_path), "--experiment", "u",
            *TINY[:-2], "--trainer.max_steps", "4", "--data.batch_size", "8", "--samples.every_n_steps", "0"]
    res = subprocess.run([sys.executable, "-m", "sagan.cli", *args], capture_output=True, text=True, env=env,
                         timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    said = [line for line in res.stderr.splitlines() if "W&B could not start this run online" in line]
    assert len(said) == 1 and "CommError" in said[0] and "wandb sync" in said[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert len(list((tmp_path / "u" / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    assert (tmp_path / "u/checkpoints/last.ckpt").is_file()
