"""Resume exactly, never lose a run, clear errors: real subprocesses killed with SIGKILL / SIGTERM, injected NaNs,
full disks, foreign and truncated checkpoints, unreadable images."""

import errno
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch


from conftest import REPO, TINY, run_cli, sigint_as_in_a_terminal, write_images

FIT = [sys.executable, "-m", "sagan.cli", "fit", "--config", str(REPO / "configs/digits.yaml"), *TINY,
       "--data.batch_size", "64", "--samples.every_n_steps", "0"]




def _state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _wait_for(pred, timeout: float, proc: subprocess.Popen) -> None:
    t = time.time()
    while time.time() - t < timeout:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def _global_step(path: Path) -> int:
    try:
        return int(_state(path)["global_step"])
    except Exception:  # noqa: BLE001 - being written / not there yet
        return -1


def _assert_same_training_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["sagan"]["g_steps"] == b["sagan"]["g_steps"] and a["sagan"]["batches_seen"] == b["sagan"]["batches_seen"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():  # G, D, EMA, spectral-norm vectors, BN statistics, sample noise: bitwise
        assert torch.equal(v, b["state_dict"][k]) if torch.is_tensor(v) else v == b["state_dict"][k], k
    for oa, ob in zip(a["optimizer_states"], b["optimizer_states"]):
        for sa, sb in zip(oa["state"].values(), ob["state"].values()):
            for k in sa:
                assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k


def _data_args(kind: str, tmp_path: Path) -> list[str]:
    """Digits in memory; or a folder of 40 images (5 batches of 8 per epoch) read by 2 workers, with random flips
    (drawn on the device), as a folder or prepared once with `sagan prepare`."""
    if kind == "digits":
        return []
    write_images(tmp_path / "imgs", 40, size=36)
    root = str(tmp_path / "imgs")
    if kind == "prepared":
        from sagan.prepared import prepare

        prepare(root, tmp_path / "prep", resolution=32, progress=False)
        root = str(tmp_path / "prep")
    return ["--config", str(REPO / "configs/celeba64.yaml"), *TINY, "--data.dataset", kind, "--data.root", root,
            "--data.resolution", "32", "--data.batch_size", "8", "--data.num_workers", "2", "--data.hflip", "true",
            "--model.g_attn", "[16]", "--model.d_attn", "[16]"]


@pytest.mark.timeout(900)
# the folder variant reads the same images through the same sampler and workers as the prepared one (and takes as
# long): it runs with `make test-slow`
@pytest.mark.parametrize("kind", ["digits", pytest.param("folder", marks=pytest.mark.slow), "prepared"])
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, kind):
    # digits: 22 batches per epoch, 60 optimizer steps (n_dis=1) are 30 batches; folders: 5 batches per epoch,
    # 24 steps are 12 batches. Either way the run, and the interrupted one, cross epoch boundaries
    steps, kill_after = (60, 14) if kind == "digits" else (24, 8)
    common = [*FIT, *_data_args(kind, tmp_path), "--output_root", str(tmp_path), "--trainer.max_steps", str(steps),
              "--checkpoint.every_n_train_steps", "2"]
    ref = subprocess.run([*common, "--experiment", "ref"], capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]

    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([*common, "--experiment", "run"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        _wait_for(lambda: _global_step(last) >= kill_after, 240, proc)
        proc.send_signal(signal.SIGKILL)  # no chance to clean up
        proc.wait(timeout=30)
    finally:
        proc.kill()
    killed_at = _global_step(last)
    assert kill_after <= killed_at < steps, killed_at  # a real interruption in the middle of the run
    res = subprocess.run([*common, "--experiment", "run", "--ckpt_path", "last"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_training_state(_state(tmp_path / "ref/checkpoints/last.ckpt"), _state(last))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
@pytest.mark.timeout(300)
def test_signal_saves_a_complete_checkpoint_and_exits_cleanly(tmp_path, sig):
    cmd = [*FIT, "--output_root", str(tmp_path), "--experiment", "p", "--trainer.max_steps", "100000",
           "--checkpoint.every_n_train_steps", "100000", "--samples.every_n_steps", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    grid = tmp_path / "p" / "samples" / "step_000003.png"
    try:
        _wait_for(grid.exists, 240, proc)  # training is under way
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    state = _state(tmp_path / "p" / "checkpoints" / "last.ckpt")
    assert 6 <= state["global_step"] < 100000 and state["sagan"]["g_steps"] >= 3
    assert state["optimizer_states"] and state["state_dict"]
    assert not list((tmp_path / "p" / "checkpoints").glob("*.tmp-*"))  # no half-written files left


@pytest.mark.timeout(300)
def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    cmd = [*FIT, "--output_root", str(tmp_path), "--experiment", "c", "--trainer.max_steps", "100000",
           "--checkpoint.every_n_train_steps", "100000", "--samples.every_n_steps", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=sigint_as_in_a_terminal)
    try:
        _wait_for((tmp_path / "c" / "samples" / "step_000003.png").exists, 240, proc)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0, out[-3000:]  # `make demo` stops there
    last = tmp_path / "c" / "checkpoints" / "last.ckpt"
    assert "interrupted (Ctrl-C) at iteration" in out and f"saved {last}" in out and "--ckpt_path last" in out, out
    assert "Traceback" not in out and "was raised with message" not in out, out[-3000:]
    state = _state(last)
    assert state["sagan"]["g_steps"] >= 3 and state["optimizer_states"] and state["state_dict"]


def _nan_after(n: int, until: int = 10**9):
    """A get_losses whose discriminator loss is NaN on calls n+1 .. until."""
    from sagan.losses import d_hinge, g_hinge

    calls = {"n": 0}

    def d_loss(real, fake):
        calls["n"] += 1
        loss = d_hinge(real, fake)
        return loss * float("nan") if n < calls["n"] <= until else loss

    return lambda name: (d_loss, g_hinge)


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    import sagan.module

    monkeypatch.setattr(sagan.module, "get_losses", _nan_after(5))  # batches 1-5 fine, NaN from batch 6
    args = ["fit", "--config", str(REPO / "configs/digits.yaml"), *TINY, "--data.batch_size", "16",
            "--output_root", str(tmp_path), "--experiment", "nan", "--trainer.max_steps", "40",
            "--checkpoint.every_n_train_steps", "4", "--samples.every_n_steps", "0"]
    assert run_cli(args) == 2
    err = capsys.readouterr().err
    assert "training diverged" in err and "iteration 5" in err and "Traceback" not in err
    state = _state(tmp_path / "nan" / "checkpoints" / "last.ckpt")  # loadable
    assert state["global_step"] == 8  # the last periodic save before the NaN, untouched
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_nan_loss_can_be_skipped_a_bounded_number_of_times(tmp_path, monkeypatch, capsys):
    import sagan.module

    monkeypatch.setattr(sagan.module, "get_losses", _nan_after(3, until=5))  # two bad batches, then fine
    base = ["fit", "--config", str(REPO / "configs/digits.yaml"), *TINY, "--data.batch_size", "16",
            "--output_root", str(tmp_path), "--samples.every_n_steps", "0", "--model.nonfinite", "skip"]
    assert run_cli([*base, "--experiment", "a", "--trainer.max_steps", "10", "--model.max_skips", "5"]) == 0
    assert _state(tmp_path / "a/checkpoints/last.ckpt")["sagan"]["skipped_steps"] == 2
    monkeypatch.setattr(sagan.module, "get_losses", _nan_after(3))
    assert run_cli([*base, "--experiment", "b", "--trainer.max_steps", "40", "--model.max_skips", "2"]) == 2
    assert "training diverged" in capsys.readouterr().err


def _a_run_with_a_checkpoint(tmp_path: Path, experiment: str) -> tuple[list[str], Path, bytes]:
    """A 2-iteration fit whose last.ckpt a later resume must leave intact: (its fit args, last.ckpt, its bytes)."""
    args = ["fit", "--config", str(REPO / "configs/digits.yaml"), *TINY, "--data.batch_size", "16",
            "--output_root", str(tmp_path), "--experiment", experiment, "--samples.every_n_steps", "0",
            "--checkpoint.every_n_train_steps", "2"]
    assert run_cli([*args, "--trainer.max_steps", "4"]) == 0
    last = tmp_path / experiment / "checkpoints" / "last.ckpt"
    return args, last, last.read_bytes()


@pytest.mark.parametrize("torch_says", ["errno", "zip writer"])
def test_disk_full_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch, capsys, torch_says):
    """A full disk as an OSError, and as torch's zip writer reports it (a RuntimeError without the errno; then the
    free space tells)."""
    args, last, before = _a_run_with_a_checkpoint(tmp_path, "full")
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if hasattr(f, "write"):
            f.write(b"partial")
        if torch_says == "errno":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1831232 vs 1831120")

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    assert run_cli([*args, "--trainer.max_steps", "8", "--ckpt_path", "last"]) == 2
    monkeypatch.setattr(torch, "save", real_save)
    err = capsys.readouterr().err
    assert "disk is full" in err and "intact" in err and "Traceback" not in err
    assert last.read_bytes() == before
    assert not list(last.parent.glob("*.tmp-*"))


def test_a_failed_write_through_torchs_real_writer_is_one_clear_error(tmp_path):
    """No mock: the process may not write files larger than half a checkpoint (RLIMIT_FSIZE, as a full disk or a
    quota would stop it), so torch's own writer fails mid-file. One line, the previous checkpoint as it was, no
    temporary file left behind."""
    import os
    import resource

    args, last, before = _a_run_with_a_checkpoint(tmp_path, "lim")
    limit = len(before) // 2

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    res = subprocess.run([sys.executable, "-m", "sagan.cli", *args, "--trainer.max_steps", "8", "--ckpt_path", "last"],
                         capture_output=True, text=True, preexec_fn=small_files, cwd=tmp_path, timeout=300,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert res.returncode == 2, res.stderr
    assert "could not write checkpoint" in res.stderr and "intact" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert last.read_bytes() == before
    assert not list(last.parent.glob("*.tmp-*"))


def test_resume_from_other_architecture_or_truncated_checkpoint(tmp_path, capsys):
    args = ["fit", "--config", str(REPO / "configs/digits.yaml"), *TINY, "--data.batch_size", "16",
            "--output_root", str(tmp_path), "--experiment", "arch", "--samples.every_n_steps", "0"]
    assert run_cli([*args, "--trainer.max_steps", "2"]) == 0
    ckpt = tmp_path / "arch/checkpoints/last.ckpt"
    capsys.readouterr()
    assert run_cli([*args, "--trainer.max_steps", "4", "--ckpt_path", str(ckpt), "--model.g_ch", "16"]) == 2
    err = capsys.readouterr().err
    assert "another architecture" in err and "g_ch=8 in the checkpoint vs 16 here" in err and "Traceback" not in err
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(ckpt.read_bytes()[:1000])
    assert run_cli([*args, "--trainer.max_steps", "4", "--ckpt_path", str(cut)]) == 2
    err = capsys.readouterr().err
    assert "corrupt or truncated" in err and "Traceback" not in err


def test_unwritable_output_folder_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    assert run_cli(["fit", "--config", str(REPO / "configs/digits.yaml"), *TINY, "--output_root", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert "not writable" in err and "--output_root" in err and "Traceback" not in err


def test_unreadable_images_skipped_and_counted_when_asked(tmp_path, recwarn):
    paths = write_images(tmp_path / "imgs", 12, size=32)
    paths[2].write_bytes(b"garbage")
    data = paths[7].read_bytes()
    paths[7].write_bytes(data[: len(data) // 3])
    args = ["fit", "--config", str(REPO / "configs/celeba64.yaml"), *TINY, "--output_root", str(tmp_path),
            "--experiment", "skip", "--data.root", str(tmp_path / "imgs"), "--data.resolution", "32",
            "--data.batch_size", "4", "--data.num_workers", "0", "--data.bad_images", "skip",
            "--model.g_attn", "[16]", "--model.d_attn", "[16]", "--trainer.max_steps", "12"]
    assert run_cli(args) == 0
    skipped = {str(w.message) for w in recwarn if "skipping unreadable image" in str(w.message)}
    assert any("img_002.png" in m for m in skipped) and any("img_007.png" in m for m in skipped)
    assert any("2 skipped so far" in m for m in skipped)
    from sagan.errors import RankWarning  # what one rank's shard met: printed by every rank (test_cli)

    assert all(w.category is RankWarning for w in recwarn if "skipping unreadable image" in str(w.message))


def test_disk_full_while_writing_a_sample_grid_names_the_file(tmp_path, monkeypatch, capsys):
    import sagan.callbacks

    args = ["fit", "--config", str(REPO / "configs/digits.yaml"), *TINY, "--data.batch_size", "16",
            "--output_root", str(tmp_path), "--experiment", "grid", "--samples.every_n_steps", "2",
            "--trainer.max_steps", "8"]

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a failed write() raises it: no file name

    monkeypatch.setattr(sagan.callbacks, "save_image", full_disk)
    assert run_cli(args) == 2
    err = capsys.readouterr().err
    assert "step_000002.png" in err and "disk is full" in err and "Traceback" not in err, err


def test_an_atomic_write_replaces_the_file_whole_or_not_at_all(tmp_path):
    """sagan.files.atomic_file, which checkpoints, the evaluation JSON and the reference cache go through: a write
    that fails midway (here: an exception after half the bytes) leaves the previous file as it was and no
    temporary file; one that completes replaces it."""
    from sagan.files import atomic_file

    path = tmp_path / "result.json"
    path.write_bytes(b"previous")
    with pytest.raises(OSError, match="No space left"):
        with atomic_file(path, fsync=True) as f:
            f.write(b"half of the ")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert path.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["result.json"]
    with atomic_file(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["result.json"]


def _out_of_memory(*a, **k):
    raise torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB "
        "is free. Including non-PyTorch memory, this process has 78.12 GiB memory in use.")


@pytest.mark.parametrize("at", [0, 2])
def test_out_of_memory_in_training_names_the_batch_size(tmp_path, monkeypatch, capsys, at):
    """A batch too large for the GPU: one line with torch's figures and the settings to lower, no traceback. At the
    first iteration nothing is saved (a rerun with a smaller batch needs no --overwrite); later the checkpoints
    written stay and the line says how to resume."""
    import sagan.module

    args = ["fit", "--config", str(REPO / "configs/digits.yaml"), *TINY, "--data.batch_size", "16",
            "--output_root", str(tmp_path), "--experiment", "oom", "--samples.every_n_steps", "0",
            "--checkpoint.every_n_train_steps", "2", "--trainer.max_steps", "8"]
    g_step = sagan.module.SAGAN.g_step

    def g_step_until(self, *a, **k):
        return (_out_of_memory if self.g_steps == at else g_step)(self, *a, **k)

    monkeypatch.setattr(sagan.module.SAGAN, "g_step", g_step_until)
    assert run_cli(args) == 2
    err = capsys.readouterr().err
    assert (f"sagan: error: out of GPU memory in training at iteration {at} (tried to allocate 2.00 GiB; GPU 0 has a "
            "total capacity of 79.19 GiB of which 1.06 GiB is free): lower --data.batch_size (now 16; e.g. "
            "--data.batch_size 8)") in err, err
    assert "bf16-mixed" in err and "Traceback" not in err, err
    last = tmp_path / "oom/checkpoints/last.ckpt"
    if at == 0:
        assert not last.exists() and "--ckpt_path" not in err
        monkeypatch.setattr(sagan.module.SAGAN, "g_step", g_step)
        assert run_cli([*args, "--data.batch_size", "8"]) == 0  # not refused as a finished run's folder
    else:
        assert _state(last)["sagan"]["g_steps"] == at and f"resume from {last} with --ckpt_path last" in err


def test_out_of_memory_in_the_in_loop_evaluation_names_its_batch_size(tmp_path, monkeypatch, capsys):
    import sagan.metrics

    monkeypatch.setattr(sagan.metrics.Evaluator, "generator", _out_of_memory)
    args = ["fit", "--config", str(REPO / "configs/digits.yaml"), *TINY, "--data.batch_size", "16",
            "--output_root", str(tmp_path), "--experiment", "oom", "--samples.every_n_steps", "0",
            "--fid.every_n_steps", "2", "--fid.num_samples", "100", "--trainer.max_steps", "8"]
    assert run_cli(args) == 2
    err = capsys.readouterr().err
    assert "out of GPU memory in the in-loop evaluation at iteration 2 (" in err, err
    assert "lower --fid.batch_size (now 100; e.g. --fid.batch_size 50)" in err and "Traceback" not in err, err
    assert _state(tmp_path / "oom/checkpoints/last.ckpt")["sagan"]["g_steps"] == 2  # saved: training was fine


def test_out_of_memory_in_evaluate_and_generate_names_batch_size(tmp_path, monkeypatch, capsys):
    import sagan.models

    args, last, _ = _a_run_with_a_checkpoint(tmp_path, "oom")
    monkeypatch.setattr(sagan.models.Generator, "forward", _out_of_memory)
    capsys.readouterr()
    assert run_cli(["evaluate", "--ckpt", str(last), "--num-samples", "20", "--metrics", "prc",
                    "--batch-size", "10", "--allow-few-samples"]) == 2
    err = capsys.readouterr().err
    assert "sagan evaluate: error: out of GPU memory in generating or scoring images (" in err, err
    assert "lower --batch-size (now 10; e.g. --batch-size 5)" in err and "Traceback" not in err, err
    assert run_cli(["generate", "--ckpt", str(last), "--outdir", str(tmp_path / "s"), "--num", "4"]) == 2
    err = capsys.readouterr().err
    assert "sagan generate: error: out of GPU memory in generating images (" in err, err
    assert "lower --batch-size (now 64; e.g. --batch-size 32)" in err and "Traceback" not in err, err
