"""The real entry point, end to end: config parsing, a few-step fit, and one-line errors for user mistakes."""


import pytest
import pytorch_lightning as pl
import torch
import yaml

from sagan.sampling import generator_from_checkpoint

from conftest import REPO, TINY, write_images, run_cli

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))




def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"digits.yaml", "cifar10.yaml", "celeba64.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config, capsys):
    assert run_cli(["fit", "--config", str(config), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["loss"] in ("hinge", "nonsaturating")
    assert printed["data"]["resolution"] in (32, 64, 128)
    assert printed["experiment"] == config.stem
    assert printed["trainer"]["max_steps"] > 0


def test_top_level_help_lists_every_command_and_refuses_the_ones_it_has_not(capsys):
    """`sagan` / `sagan --help` list fit, evaluate, generate and prepare (not LightningCLI's validate / test /
    predict, which the model has no step for); those and typos are one clear error, not a traceback."""
    from sagan.cli import COMMANDS

    for argv, code in (([], 2), (["--help"], 0), (["-h"], 0)):
        assert run_cli(argv) == code
        out = capsys.readouterr().out
        assert out.startswith("usage: sagan {fit,evaluate,generate,prepare}")
        assert all(f"  {name}" in out for name in COMMANDS)
    assert run_cli(["--version"]) == 0 and capsys.readouterr().out.startswith("sagan ")
    for bad in ("validate", "test", "predict", "fitt"):
        assert run_cli([bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"sagan: error: {bad!r} is not a sagan command") and "fit, evaluate, generate" in err
    assert run_cli(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--model.mode_seeking" in out and "--data.root" in out


def test_fit_end_to_end_writes_checkpoint_samples_and_config(tmp_path, capsys):
    args = ["fit", "--config", str(REPO / "configs/digits.yaml"), "--output_root", str(tmp_path),
            "--experiment", "e2e", *TINY, "--trainer.max_steps", "6", "--samples.every_n_steps", "2",
            "--data.batch_size", "8"]
    assert run_cli(args) == 0
    run = tmp_path / "e2e"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step_000002.png", "step_000003.png"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["g_ch"] == 8 and saved["data"]["dataset"] == "digits"
    hparams = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert hparams["num_classes"] == 10 and hparams["img_channels"] == 1 and hparams["resolution"] == 32
    out = capsys.readouterr()
    assert "checkpoint:" in out.out + out.err and str(ckpt) in out.out + out.err
    g = generator_from_checkpoint(ckpt)
    img = g(torch.randn(3, 16), torch.tensor([0, 5, 9]))
    assert img.shape == (3, 1, 32, 32)


def test_time_limit_ends_the_run_with_its_checkpoint_grid_and_summary(tmp_path, capsys):
    """`make demo` caps the fit with trainer.max_time: a run it stops keeps the state of its last iteration, writes
    that iteration's grid, and says why it stopped before max_steps."""
    args = ["fit", "--config", str(REPO / "configs/digits.yaml"), "--output_root", str(tmp_path),
            "--experiment", "timed", *TINY, "--trainer.max_steps", "100000", "--trainer.max_time", "00:00:00:02",
            "--samples.every_n_steps", "0", "--data.batch_size", "8"]
    assert run_cli(args) == 0
    out = capsys.readouterr()
    line = next(x for x in out.out.splitlines() if x.startswith("sagan: trained"))
    iterations = int(line.split()[2])
    assert 0 < iterations < 50000
    assert "stopped by trainer.max_time (2 s of training) before trainer.max_steps (100000)" in line
    run = tmp_path / "timed"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["sagan"]["g_steps"] == iterations
    assert [p.name for p in (run / "samples").glob("*.png")] == [f"step_{iterations:06d}.png"]


def test_last_checkpoint_holds_the_final_step_between_periodic_saves(tmp_path):
    """max_steps 10 with a checkpoint every 4 steps: Lightning's save_last copies the step-8 checkpoint; the run
    ended at step 10, and last.ckpt (what `sagan evaluate` and `make demo` read) must hold step 10."""
    args = ["fit", "--config", str(REPO / "configs/digits.yaml"), "--output_root", str(tmp_path),
            "--experiment", "unaligned", *TINY, "--trainer.max_steps", "10", "--checkpoint.every_n_train_steps", "4",
            "--samples.every_n_steps", "0", "--data.batch_size", "8"]
    assert run_cli(args) == 0
    folder = tmp_path / "unaligned" / "checkpoints"
    state = torch.load(folder / "last.ckpt", weights_only=True)
    assert state["global_step"] == 10 and state["sagan"]["g_steps"] == 5
    assert {f.name for f in folder.glob("step=*.ckpt")} == {"step=4.ckpt", "step=8.ckpt", "step=10.ckpt"}


def test_fit_on_class_folder_links_classes_and_channels(tmp_path, class_folder):
    args = ["fit", "--config", str(REPO / "configs/celeba64.yaml"), "--output_root", str(tmp_path),
            "--experiment", "folder", *TINY, "--data.root", str(class_folder), "--data.resolution", "32",
            "--data.num_workers", "0", "--data.batch_size", "4", "--model.conditional", "true",
            "--model.g_attn", "[16]", "--model.d_attn", "[16]", "--trainer.max_steps", "2"]
    assert run_cli(args) == 0
    ckpt = tmp_path / "folder" / "checkpoints" / "last.ckpt"
    hparams = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert hparams["num_classes"] == 2 and hparams["img_channels"] == 3 and hparams["resolution"] == 32


def _one_line_error(capsys, *needles: str) -> None:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


def test_a_mistyped_option_or_config_key_names_the_closest_real_one(tmp_path, capsys):
    """Every command's error for a mistyped option says which option was meant: a near spelling in the same group
    first, else the same name in another group; a name like nothing gets no guess."""
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  lecm_weight: 0.3\n")
    fit = ["fit", "--config", str(REPO / "configs/digits.yaml")]
    for argv, meant in (
        ([*fit, "--model.lecm_weight", "0.3"], "--model.lecam_weight"),
        ([*fit, "--model.batch_size", "8"], "--data.batch_size"),
        ([*fit, "--config", str(typo)], "model.lecam_weight"),
        (["evaluate", "--ckpt", "x.ckpt", "--num-smples", "10"], "--num-samples"),
        (["generate", "--ckpt", "x.ckpt", "--outdir", "o", "--truncaton", "1"], "--truncation"),
        (["prepare", "--source", "s", "--out", "o", "--resolution", "32", "--wrokers", "2"], "--workers"),
        ([*fit, "--model.zzz", "1"], None),
        # the option it stands for is required: named as the mistyped one, not as one missing
        (["prepare", "--source", "s", "--out", "o", "--resolutoin", "32"], "--resolution"),
        (["generate", "--ckt", "x.ckpt", "--outdir", "o"], "--ckpt"),
        (["evaluate", "--chkpt=x.ckpt"], "--ckpt"),
    ):
        assert run_cli(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "Traceback" not in err
        if meant is None:
            assert "did you mean" not in err, err
        else:
            assert err.endswith(f"(did you mean {meant}?)"), err


def test_unknown_config_key_is_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    cfg = yaml.safe_load((REPO / "configs/digits.yaml").read_text())
    cfg["model"]["attention_heads"] = 4
    bad.write_text(yaml.safe_dump(cfg))
    assert run_cli(["fit", "--config", str(bad)]) == 2
    _one_line_error(capsys, "attention_heads")


def test_wrong_type_is_one_clear_error(capsys):
    assert run_cli(["fit", "--config", str(REPO / "configs/digits.yaml"), "--model.n_dis", "many"]) == 2
    _one_line_error(capsys, "n_dis")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_gpu_preset_on_a_machine_without_gpu_is_one_clear_error(tmp_path, capsys):
    code = run_cli(["fit", "--config", str(REPO / "configs/digits.yaml"), "--config",
                    str(REPO / "configs/trainer/gpu.yaml"), "--output_root", str(tmp_path), "--trainer.logger",
                    "false", "--trainer.max_steps", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("sagan: error: the trainer settings do not fit this machine") and "no CUDA GPU here" in err


@pytest.mark.parametrize("flags, says", [
    (["--model.lr_g", "-1"], "model.lr_g must be > 0, got -1.0"),
    (["--model.betas_d", "[0.5, 1.0]"], "model.betas_d must be two numbers in [0, 1)"),
    (["--fid.every_n_steps", "5", "--fid.num_samples", "0"], "fid.num_samples and fid.batch_size must be >= 1"),
    (["--fid.every_n_steps", "5", "--fid.metrics", "[fid, foo]"], "fid.metrics: unknown metric(s) ['foo']"),
    (["--attention_maps.every_n_steps", "1", "--attention_maps.num_images", "0"], "attention_maps.num_images must"),
    (["--checkpoint.every_n_train_steps", "-5"], "every_n_train_steps=-5. Must be >= 0 (sagan fit --help"),
    (["--trainer.gradient_clip_val", "1.0"], "trainer.gradient_clip_val 1.0 is not supported: sagan's D and G steps"),
    (["--trainer.accumulate_grad_batches", "2"], "accumulate_grad_batches 2 is not supported: sagan's D and G steps"),
    (["--trainer.precision", "bf16-true"], "trainer.precision bf16-true is not supported: sagan trains float32"),
    (["--trainer.precision", "64"], "trainer.precision 64 is not supported: sagan trains float32 weights"),
    (["--trainer.devices", "2", "--trainer.strategy", "ddp_spawn"], "ddp_spawn starts its processes by pickling"),
    (["--trainer.devices", "2", "--trainer.strategy", "fsdp"], "trainer.strategy fsdp is not supported: sagan"),
    (["--trainer.strategy", "deepspeed_stage_2"], "trainer.strategy deepspeed_stage_2 is not supported"),
])
def test_settings_that_would_fail_mid_run_are_refused_before_it(tmp_path, capsys, flags, says):
    """Values that used to pass and then fail with a traceback in the first optimizer step, evaluation or
    attention map (possibly hours into a run), or in Lightning's checkpoint callback: one line before training."""
    code = run_cli(["fit", "--config", str(REPO / "configs/digits.yaml"), "--output_root", str(tmp_path),
                    "--trainer.logger", "false", "--trainer.max_steps", "4", "--fid.every_n_steps", "0", *flags])
    assert code == 2
    _one_line_error(capsys, says)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_too_few_images_for_in_loop_fid_are_refused_at_fit_start(tmp_path, capsys):
    """FID on 64-d features from 10 samples was refused at the first evaluation (on the paper configs, iteration
    5,000), naming sagan evaluate's flags; now before training, naming fit's, and before the reference statistics
    are built (on a CPU, minutes of InceptionV3 for a few thousand images, only to be told the count is short)."""
    code = run_cli(["fit", "--config", str(REPO / "configs/digits.yaml"), "--output_root", str(tmp_path), *TINY,
                    "--trainer.max_steps", "4", "--fid.every_n_steps", "2", "--fid.num_samples", "10",
                    "--fid.cache_root", str(tmp_path / "cache")])
    assert code == 2
    _one_line_error(capsys, "needs at least 64 images per set", "raise --fid.num_samples to at least 64")
    assert not list(tmp_path.rglob("*.ckpt"))
    assert not (tmp_path / "cache").exists()  # the reference was never read

def test_unsupported_resolution_is_one_clear_error(tmp_path, capsys):
    code = run_cli(["fit", "--config", str(REPO / "configs/digits.yaml"), "--output_root", str(tmp_path),
                    "--data.resolution", "48"])
    assert code == 2
    _one_line_error(capsys, "resolution 48 is not supported", "[32, 64, 128]")


def test_missing_image_folder_is_one_clear_error(tmp_path, capsys):
    code = run_cli(["fit", "--config", str(REPO / "configs/celeba64.yaml"), "--output_root", str(tmp_path),
                    "--data.root", str(tmp_path / "missing")])
    assert code == 2
    _one_line_error(capsys, "missing", "does not exist", "data.root")


def test_empty_image_folder_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = run_cli(["fit", "--config", str(REPO / "configs/celeba64.yaml"), "--output_root", str(tmp_path),
                    "--data.root", str(tmp_path / "empty")])
    assert code == 2
    _one_line_error(capsys, "holds no images")


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image_stops_with_one_error_and_keeps_checkpoint(tmp_path, capsys, workers):
    data = tmp_path / "imgs"
    paths = write_images(data, 8, size=32)
    common = ["fit", "--config", str(REPO / "configs/celeba64.yaml"), "--output_root", str(tmp_path),
              "--experiment", "run", *TINY, "--data.root", str(data), "--data.resolution", "32",
              "--data.batch_size", "8", "--data.num_workers", str(workers), "--model.g_attn", "[16]",
              "--model.d_attn", "[16]", "--trainer.max_steps", "2"]
    assert run_cli(common) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    before = ckpt.read_bytes()
    capsys.readouterr()
    assert run_cli(common) == 2  # a second fresh run would replace the checkpoint: refused
    _one_line_error(capsys, "last.ckpt already exists", "--ckpt_path last", "--overwrite true")
    paths[5].write_bytes(b"\x89PNG garbage")
    assert run_cli([*common, "--overwrite", "true"]) == 2
    _one_line_error(capsys, "img_005.png", "remove or replace")
    assert ckpt.read_bytes() == before  # nothing already written is lost
    generator_from_checkpoint(ckpt)
    write_images(data, 8, size=32)  # the images repaired: a fresh run replaces the old one
    assert run_cli([*common, "--overwrite", "true", "--trainer.max_steps", "4"]) == 0
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 4  # replaced, not versioned
    assert not list(ckpt.parent.glob("*-v*.ckpt"))


def test_overwrite_moves_the_previous_runs_checkpoints_aside(tmp_path):
    common = ["fit", "--config", str(REPO / "configs/digits.yaml"), "--output_root", str(tmp_path),
              "--experiment", "again", *TINY, "--data.batch_size", "8", "--samples.every_n_steps", "0",
              "--checkpoint.every_n_train_steps", "2", "--attention_maps.every_n_steps", "1"]
    assert run_cli([*common, "--trainer.max_steps", "6"]) == 0
    folder = tmp_path / "again" / "checkpoints"
    samples, attention = tmp_path / "again" / "samples", tmp_path / "again" / "attention"
    assert {f.name for f in samples.glob("*.png")} == {"step_000003.png"}  # n_dis 1: 3 iterations, the final grid
    assert {f.name for f in attention.glob("*.png")} == {"step_000001.png", "step_000002.png", "step_000003.png"}
    assert {f.name for f in folder.glob("*.ckpt")} == {"step=2.ckpt", "step=4.ckpt", "step=6.ckpt", "last.ckpt"}
    (folder / "best.ckpt").write_bytes(b"the old run's best")
    # the new run's in-loop FID writes its best.ckpt at iteration 1, before its first periodic checkpoint
    assert run_cli([*common, "--trainer.max_steps", "4", "--overwrite", "true", "--fid.every_n_steps", "1",
                    "--fid.num_samples", "100", "--fid.metrics", "[fid]"]) == 0
    assert (folder / "best.ckpt").read_bytes() != b"the old run's best"  # replaced by this run's ...
    generator_from_checkpoint(folder / "best.ckpt")
    assert not (folder / "previous" / "best.ckpt").exists()  # ... which was not moved away as the old run's
    # only this run's periodic checkpoints in the folder: a stale step=6.ckpt would pass for the newest
    assert {f.name for f in folder.glob("*.ckpt")} == {"step=2.ckpt", "step=4.ckpt", "last.ckpt", "best.ckpt"}
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 4
    previous = folder / "previous"  # the replaced run, whole
    assert {f.name for f in previous.glob("*.ckpt")} == {"step=2.ckpt", "step=4.ckpt", "step=6.ckpt", "last.ckpt"}
    assert torch.load(previous / "last.ckpt", weights_only=True)["global_step"] == 6
    # grids and attention maps likewise: a stale step_000003.png would pass for this run's newest
    assert {f.name for f in samples.glob("*.png")} == {"step_000002.png"}
    assert {f.name for f in (samples / "previous").glob("*.png")} == {"step_000003.png"}
    assert {f.name for f in attention.glob("*.png")} == {"step_000001.png", "step_000002.png"}
    assert {f.name for f in (attention / "previous").glob("*.png")} == {"step_000001.png", "step_000002.png",
                                                                       "step_000003.png"}
    assert run_cli([*common, "--trainer.max_steps", "6", "--ckpt_path", "last"]) == 0  # resuming moves nothing
    assert torch.load(previous / "last.ckpt", weights_only=True)["global_step"] == 6
    assert {f.name for f in folder.glob("*.ckpt")} == {"step=2.ckpt", "step=4.ckpt", "step=6.ckpt", "last.ckpt",
                                                         "best.ckpt"}
    assert {f.name for f in samples.glob("*.png")} == {"step_000002.png", "step_000003.png"}
    assert {f.name for f in (samples / "previous").glob("*.png")} == {"step_000003.png"}
    assert {f.name for f in attention.glob("*.png")} == {"step_000001.png", "step_000002.png", "step_000003.png"}


def test_resume_from_last_checkpoint_continues_the_run(tmp_path, capsys):
    """A resume continues the counters and says how many iterations were its own; one with a budget already spent
    says there was nothing to train; ``--ckpt_path last`` where there is no checkpoint (a mistyped experiment)
    says it starts afresh in sagan's words, and Lightning's notices about either case stay out."""
    import warnings

    common = ["fit", "--config", str(REPO / "configs/digits.yaml"), "--output_root", str(tmp_path),
              "--experiment", "resume", *TINY, "--data.batch_size", "8", "--samples.every_n_steps", "0"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_cli([*common, "--trainer.max_steps", "4", "--ckpt_path", "last"]) == 0
    ckpt = tmp_path / "resume" / "checkpoints" / "last.ckpt"
    said = [str(w.message) for w in caught]
    assert [m for m in said if "--ckpt_path last" in m] == [
        f"--ckpt_path last: there is no checkpoint at {ckpt} yet, so this is a fresh run (check --experiment and "
        "--output_root if you meant to resume)"], said
    assert not [m for m in said if "no last checkpoint available" in m], said
    assert torch.load(ckpt, weights_only=True)["sagan"]["g_steps"] == 2
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_cli([*common, "--trainer.max_steps", "8", "--ckpt_path", "last"]) == 0
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    assert "sagan: trained 4 iterations (4 discriminator steps), 2 of them in this run" in capsys.readouterr().out
    state = torch.load(ckpt, weights_only=True)
    assert {k: state["sagan"][k] for k in ("d_steps", "g_steps", "batches_seen")} == {
        "d_steps": 4, "g_steps": 4, "batches_seen": 4}
    assert state["global_step"] == 8
    assert run_cli([*common, "--trainer.max_steps", "6", "--ckpt_path", "last"]) == 0
    out = capsys.readouterr().out
    assert ("sagan: nothing to train: the checkpoint is at iteration 4 (optimizer step 8) and trainer.max_steps is "
            "6; raise --trainer.max_steps") in out and "sagan: trained" not in out, out
    assert torch.load(ckpt, weights_only=True)["global_step"] == 8


def test_ddp_trainer_preset_stacks_on_an_experiment(capsys):
    args = ["fit", "--config", str(REPO / "configs/cifar10.yaml"), "--config", str(REPO / "configs/trainer/ddp.yaml"),
            "--print_config"]
    assert run_cli(args) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    strategy = printed["trainer"]["strategy"]
    assert strategy["class_path"] == "sagan.strategy.GANDDPStrategy"
    assert strategy["init_args"]["find_unused_parameters"] is False
    assert printed["trainer"]["sync_batchnorm"] is True and printed["model"]["n_dis"] == 5


def test_warnings_print_once_per_job_but_what_one_rank_met_on_every_rank(monkeypatch):
    """Under DDP every process makes the same checks: rank 0 alone prints them (test_ddp counts the lines of a
    2-process fit). An image that one rank's shard could not read is that rank's alone: every rank prints it."""
    import warnings

    from lightning_fabric.utilities.rank_zero import rank_zero_only

    from sagan.cli import _one_line_sagan_warnings
    from sagan.errors import RankWarning, SaganWarning

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after the test
    _one_line_sagan_warnings()
    fmt = warnings.formatwarning
    for rank, same, own in ((0, "sagan: warning: setting x does nothing\n", "sagan: warning: skipping img.png\n"),
                            (1, "", "sagan: warning: [rank 1] skipping img.png\n")):
        monkeypatch.setattr(rank_zero_only, "rank", rank)
        assert fmt("setting x does nothing", SaganWarning, "f.py", 1) == same
        assert fmt("skipping img.png", RankWarning, "f.py", 1) == own
    assert "f.py" in fmt("other", UserWarning, "f.py", 1)  # other packages' warnings keep their format

def test_a_fit_prints_no_third_party_notices_a_user_cannot_act_on(tmp_path):
    """The demo's output, as a user sees it in a fresh process (W&B offline, the config's logger): none of the
    notices other packages print on every run (torch's LeafSpec deprecation met inside Lightning, Lightning's
    logger advertisement, W&B's 'anonymous' notice, Lightning's wrong warning that an epoch is shorter than the
    logging interval), and still the run summary. sagan's own warning about a
    setting (here: the auxiliary classifier of a model made unconditional) is one line, without the location in
    Lightning's code that Python's format would print."""
    import os
    import subprocess
    import sys

    args = ["fit", "--config", str(REPO / "configs/digits.yaml"), "--output_root", str(tmp_path), "--experiment", "q",
            *TINY[:-2], "--trainer.max_steps", "2", "--data.batch_size", "8", "--samples.every_n_steps", "0",
            "--model.conditional", "false", "--trainer.log_every_n_steps", "500"]  # more than an epoch's 180 batches
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "default"}
    res = subprocess.run([sys.executable, "-m", "sagan.cli", *args], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "checkpoint:" in out and "wandb" in out.lower()  # the run and its W&B lines are still there
    assert "sagan: trained 1 iteration (1 discriminator step)\n" in out, out
    for notice in ("LeafSpec", "litlogger", "anonymous setting", "smaller than the logging interval"):
        assert notice not in out, notice
    ours = [ln for ln in out.splitlines() if "class_weight is ignored" in ln]
    assert ours == ["sagan: warning: model.class_weight is ignored: the model is unconditional (model.conditional "
                    "false), so the model trains without the auxiliary classifier"], out
    assert "SaganWarning" not in out and "instantiate_module" not in out, out


def test_progress_lines_end_with_one_line_at_the_final_count(capsys):
    """In a log (not a terminal) progress is a line every few seconds and one at the end; a last update that had
    just printed its line printed the same line again when the pass closed."""
    from sagan.progress import _Lines

    with _Lines(300, "reference features", "img", every_s=0.0, disable=False) as bar:
        for _ in range(3):
            bar.update(100)
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(",")[0] for ln in lines] == ["reference features: 100/300 (33%) img",
                                                   "reference features: 200/300 (67%) img",
                                                   "reference features: 300/300 (100%) img"]
    with _Lines(300, "generating", "img", every_s=3600.0, disable=False) as bar:
        bar.update(300)
    assert capsys.readouterr().err.startswith("generating: 300/300 (100%) img")  # the closing line is there


def test_fast_dev_run_in_a_finished_run_folder_writes_no_checkpoint_and_keeps_its_config(tmp_path, capsys):
    """Lightning's fast_dev_run ('logging and checkpointing suppressed') still wrote last.ckpt (its save_last at
    train end ignores the flag), and was refused in a folder with a last.ckpt unless --overwrite, which would have
    moved the run's checkpoints to previous/. The run's config.yaml stays too (LightningCLI saves none then)."""
    folder = tmp_path / "r" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(b"the run's last checkpoint")
    (tmp_path / "r" / "config.yaml").write_text("the run's config\n")
    code = run_cli(["fit", "--config", str(REPO / "configs/digits.yaml"), "--output_root", str(tmp_path),
                    "--experiment", "r", *TINY, "--data.batch_size", "8", "--trainer.fast_dev_run", "true"])
    assert code == 0
    assert "sagan: trained 1 iteration" in capsys.readouterr().out
    assert [p.name for p in folder.iterdir()] == ["last.ckpt"]
    assert (folder / "last.ckpt").read_bytes() == b"the run's last checkpoint"
    assert (tmp_path / "r" / "config.yaml").read_text() == "the run's config\n"


def test_multi_gpu_script_reads_paths_from_where_it_is_run(tmp_path):
    """scripts/train_multi_gpu.sh finds its venv and ddp.yaml beside itself; the config and paths given to it are
    read from the caller's folder, as with `sagan fit` (it changed to the repository first: a config there was
    not found)."""
    import subprocess

    if not (REPO / ".venv/bin/sagan").exists():
        pytest.skip("needs the project's .venv (make install)")
    (tmp_path / "mine.yaml").write_text("data:\n  root: my_images\n")
    res = subprocess.run(["bash", str(REPO / "scripts/train_multi_gpu.sh"), "mine.yaml", "--print_config"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "root: my_images" in res.stdout and "GANDDPStrategy" in res.stdout


def test_a_leading_tilde_is_the_home_folder_in_every_path_setting(tmp_path, monkeypatch):
    """`root: ~/data` in a YAML config, `--opt=~/x` and $SAGAN_INCEPTION_WEIGHTS reach sagan unexpanded (no shell
    expands them): data.root was 'not found' and output_root made a folder named '~' in the current one."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    write_images(tmp_path / "home/imgs", 8, size=32)
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("data:\n  dataset: folder\n  root: ~/imgs\n  resolution: 32\n  batch_size: 4\n  num_workers: 0\n"
                   "output_root: ~/runs\n")
    args = ["fit", "--config", str(REPO / "configs/digits.yaml"), *TINY, "--config", str(cfg),
            "--experiment", "t", "--samples.every_n_steps", "0"]
    assert run_cli([*args, "--trainer.max_steps", "2"]) == 0
    last = tmp_path / "home/runs/t/checkpoints/last.ckpt"
    assert last.is_file() and not (tmp_path / "~").exists()
    assert run_cli([*args, "--trainer.max_steps", "4", "--ckpt_path=~/runs/t/checkpoints/last.ckpt"]) == 0
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert run_cli(["generate", "--ckpt=~/runs/t/checkpoints/last.ckpt", "--outdir=~/gen", "--num", "2"]) == 0
    assert len(list((tmp_path / "home/gen").glob("*.png"))) == 2
    assert run_cli(["prepare", "--source=~/imgs", "--out=~/prep", "--resolution", "32"]) == 0
    assert (tmp_path / "home/prep/manifest.json").is_file()
    assert run_cli(["evaluate", "--folders", "~/imgs", "~/imgs", "--feature-extractor", "digits-mlp", "--metrics", "prc",
                    "--allow-few-samples", "--json=~/m.json"]) == 0
    assert (tmp_path / "home/m.json").is_file()
    from sagan.metrics import WEIGHTS_ENV, MetricsError, resolve_feature_extractor

    (tmp_path / "home/w.pth").write_bytes(b"not weights")
    monkeypatch.setenv(WEIGHTS_ENV, "~/w.pth")
    with pytest.raises(MetricsError, match=f"file '{tmp_path / 'home/w.pth'}' is not a plain state dict"):
        resolve_feature_extractor()  # found (and read) at the expanded path
    assert not (tmp_path / "~").exists()


def test_a_failing_torch_compile_is_one_line_naming_the_switch(tmp_path, monkeypatch, capsys):
    """--model.compile true where Inductor finds no C++ compiler (a CPU machine without g++): 130 lines of torch's
    traceback at the first step; now one line with the fix. An error of the model itself stays a traceback."""
    import torch._inductor.exc as inductor

    def no_compiler(module, mode=None):
        def run(*a, **k):
            raise inductor.InductorError(inductor.InvalidCxxCompiler(), None)
        return run

    monkeypatch.setattr(torch, "compile", no_compiler)
    args = ["fit", "--config", str(REPO / "configs/digits.yaml"), *TINY, "--output_root", str(tmp_path),
            "--trainer.max_steps", "4", "--samples.every_n_steps", "0", "--model.compile", "true"]
    assert run_cli(args) == 2
    _one_line_error(capsys, "model.compile: torch.compile failed (InductorError: InvalidCxxCompiler: No working C++ "
                    "compiler found")
    assert not list(tmp_path.rglob("*.ckpt"))
    monkeypatch.setattr(torch, "compile", lambda module, mode=None: (lambda *a, **k: 1 / 0))
    with pytest.raises(ZeroDivisionError):
        run_cli(args + ["--overwrite", "true"])


class NeedsAbsentPackage(pl.Callback):
    """A callback that, like Lightning's RichProgressBar without rich, cannot be built here."""

    def __init__(self) -> None:
        raise ModuleNotFoundError("`NeedsAbsentPackage` requires `absent_package`. Install it.")


class NeedsAbsentPackageAtSetup(pl.Callback):
    """Like Lightning's DeviceStatsMonitor without psutil: built, then fails when the fit sets it up."""

    def setup(self, trainer, pl_module, stage) -> None:
        raise ModuleNotFoundError("`NeedsAbsentPackageAtSetup` cannot log as `absent_package` is not installed.")


@pytest.mark.parametrize("callback", ["NeedsAbsentPackage", "NeedsAbsentPackageAtSetup"])
def test_a_class_from_the_config_missing_its_package_is_one_line(tmp_path, capsys, callback):
    """A callback or logger named in the config whose optional package is missing: jsonargparse's 60-line chain of
    tracebacks (or Lightning's own at setup); now one line naming the class and the package."""
    code = run_cli(["fit", "--config", str(REPO / "configs/digits.yaml"), *TINY, "--output_root", str(tmp_path),
                    "--trainer.max_steps", "2", f"--trainer.callbacks+=test_cli.{callback}"])
    assert code == 2
    _one_line_error(capsys, "requires `absent_package`" if callback == "NeedsAbsentPackage" else "is not installed",
                    "(a package it needs is not installed: install it, or drop that class)",
                    *(["sagan: error: test_cli.NeedsAbsentPackage: "] if callback == "NeedsAbsentPackage" else []))
