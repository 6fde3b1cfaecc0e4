"""Every recipe config builds what its header claims, as its cited source has it: attention resolutions, widths,
D steps, learning rates, betas, batch size, conditioning."""

from contextlib import nullcontext

import pytest
import torch
import yaml

from sagan.models import attention_layers
from sagan.module import SAGAN

from conftest import REPO, run_cli

# What each config's header cites (and the source says), checked on the networks the config builds.
CLAIMS = {
    "cifar10.yaml": dict(  # StudioGAN src/configs/CIFAR10/SAGAN.yaml + src/config.py defaults + resnet.py widths
        resolution=32, conditional=True, g_attn=[16], d_attn=[16], g_widths=[256, 256, 256, 256],
        d_widths=[128, 128, 128, 128], d_down=[True, True, False, False], n_dis=5, lr_g=2e-4, lr_d=2e-4,
        betas=(0.5, 0.999), batch_size=64, loss="hinge", cbn_sn=True, iterations=100_000, fake_labels="uniform",
    ),
    "celeba64.yaml": dict(  # SAGAN paper section 5 + official code's 64x64 widths
        resolution=64, conditional=False, g_attn=[32], d_attn=[32], g_widths=[1024, 1024, 512, 256, 128],
        d_widths=[64, 128, 256, 512, 1024], d_down=[True, True, True, True, False], n_dis=1, lr_g=1e-4,
        lr_d=4e-4, betas=(0.0, 0.9), batch_size=64, loss="hinge", iterations=100_000,
    ),
    "imagenet128.yaml": dict(  # SAGAN paper section 5 + official code's 128x128 networks + BigGAN's batch / length
        resolution=128, conditional=True, g_attn=[32], d_attn=[32], g_widths=[1024, 1024, 512, 256, 128, 64],
        d_widths=[64, 128, 256, 512, 1024, 1024], d_down=[True, True, True, True, True, False], n_dis=1,
        lr_g=1e-4, lr_d=4e-4, betas=(0.0, 0.9), batch_size=256, loss="hinge", iterations=1_000_000,
        fake_labels="uniform",
    ),
}


def _resolved(name: str, capsys) -> dict:
    assert run_cli(["fit", "--config", str(REPO / "configs" / name), "--print_config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("name", sorted(CLAIMS))
def test_recipe_config_matches_its_source(name, capsys):
    claim = CLAIMS[name]
    cfg = _resolved(name, capsys)
    text = (REPO / "configs" / name).read_text()
    assert "Source:" in text  # the header cites where the recipe comes from
    m, d = cfg["model"], cfg["data"]
    assert d["resolution"] == claim["resolution"] and d["batch_size"] == claim["batch_size"]
    assert m["n_dis"] == claim["n_dis"] and m["loss"] == claim["loss"]
    assert m["lr_g"] == pytest.approx(claim["lr_g"]) and m["lr_d"] == pytest.approx(claim["lr_d"])
    assert tuple(m["betas_g"]) == tuple(m["betas_d"]) == claim["betas"]
    assert cfg["trainer"]["max_steps"] == claim["iterations"] * (claim["n_dis"] + 1)
    assert m["cbn_sn"] == claim.get("cbn_sn", False)
    assert m["fake_labels"] == claim.get("fake_labels", "auto")  # the sources draw G's classes uniformly
    model_args = {k: v for k, v in m.items() if k not in ("resolution", "img_channels", "num_classes")}
    model = SAGAN(resolution=d["resolution"], img_channels=3, num_classes=10 if claim["conditional"] else 0,
                  **model_args)
    g, disc = model.generator, model.discriminator
    assert model.conditional == claim["conditional"]
    assert sorted(attention_layers(g)) == claim["g_attn"] and sorted(attention_layers(disc)) == claim["d_attn"]
    assert [b.conv1.out_channels for b in g.blocks] == claim["g_widths"][1:]
    assert g.linear.out_features == claim["g_widths"][0] * 16  # the 4x4 input
    assert [b.conv2.out_channels for b in disc.blocks] == claim["d_widths"]
    assert [b.downsample for b in disc.blocks] == claim["d_down"]


def test_gpu_preset_stacks_on_an_experiment_and_sets_fast_math(capsys, monkeypatch):
    assert run_cli(["fit", "--config", str(REPO / "configs/cifar10.yaml"), "--config",
                    str(REPO / "configs/trainer/gpu.yaml"), "--print_config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["trainer"]["precision"] == "bf16-mixed" and cfg["model"]["channels_last"] is True
    assert cfg["model"]["n_dis"] == 5 and cfg["data"]["batch_size"] == 64  # the recipe itself is kept
    from sagan.callbacks import FastMath

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    before = torch.get_float32_matmul_precision()
    try:
        FastMath(**cfg["fast_math"]).setup(None, None, "fit")
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.benchmark is True
    finally:
        torch.set_float32_matmul_precision(before)
        torch.backends.cudnn.allow_tf32 = True


def test_folder_config_is_the_digits_recipe_without_skip_z(capsys):
    """configs/folder32.yaml is the demo's small-data recipe for anyone's image folder: the same model section as
    configs/digits.yaml but for skip_z (BENCHMARKS.md: on photographs it trades fidelity for variety), so a change to
    the demo's recipe cannot silently leave the folder recipe behind. Mode seeking is lower (the weight README says
    to start at) for the same reason, and LeCam is on: on a flat folder it keeps every kind of image (BENCHMARKS.md
    "LeCam regularisation keeps the kinds"), and the digits demo never has a flat folder. G's labels follow the
    folder's class frequencies; the balanced digits keep the uniform draw their figures were measured with."""
    digits, folder = _resolved("digits.yaml", capsys), _resolved("folder32.yaml", capsys)
    assert digits["model"]["skip_z"] is True and folder["model"]["skip_z"] is False
    assert folder["model"]["mode_seeking"] == 0.1 < digits["model"]["mode_seeking"]
    assert folder["model"]["lecam_weight"] == 0.3 and digits["model"]["lecam_weight"] == 0.0
    assert folder["model"]["fake_labels"] == "auto" and digits["model"]["fake_labels"] == "uniform"
    own = ("skip_z", "mode_seeking", "lecam_weight", "fake_labels")
    assert {k: v for k, v in folder["model"].items() if k not in own} == \
        {k: v for k, v in digits["model"].items() if k not in own}
    d = folder["data"]
    assert d["dataset"] == "folder" and d["root"] is None and d["resolution"] == 32 and d["hflip"] is True
    assert d["batch_size"] == digits["data"]["batch_size"] and folder["fid"]["every_n_steps"] == 0


@pytest.mark.parametrize("layout", ["classes", "flat"])
def test_folder_config_trains_on_a_class_folder_and_a_flat_one(tmp_path, layout):
    from conftest import write_images

    root = tmp_path / "images"
    if layout == "classes":
        write_images(root / "cat", 8, seed=1)
        write_images(root / "dog", 8, seed=2)
    else:
        write_images(root, 16, seed=3)
    args = ["fit", "--config", str(REPO / "configs/folder32.yaml"), "--output_root", str(tmp_path),
            "--data.root", str(root), "--data.batch_size", "4", "--data.num_workers", "0",
            "--trainer.max_steps", "4", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--attention_maps.every_n_steps", "0", "--samples.every_n_steps", "2"]
    with pytest.warns(UserWarning, match="class_weight is ignored") if layout == "flat" else nullcontext():
        assert run_cli(args) == 0
    ckpt = torch.load(tmp_path / "folder32" / "checkpoints" / "last.ckpt", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["num_classes"] == (2 if layout == "classes" else 0) and hp["img_channels"] == 3
    assert ckpt["sagan"]["g_steps"] == 2
    assert (tmp_path / "folder32" / "samples" / "step_000002.png").is_file()
