"""Every recipe config builds what its header claims, as its cited source has it: attention resolutions, widths,
D steps, learning rates, betas, batch size, conditioning."""

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
        betas=(0.5, 0.999), batch_size=64, loss="hinge", cbn_sn=True, iterations=100_000,
    ),
    "celeba64.yaml": dict(  # SAGAN paper section 5 + official code's 64x64 widths
        resolution=64, conditional=False, g_attn=[32], d_attn=[32], g_widths=[1024, 1024, 512, 256, 128],
        d_widths=[64, 128, 256, 512, 1024], d_down=[True, True, True, True, False], n_dis=1, lr_g=1e-4,
        lr_d=4e-4, betas=(0.0, 0.9), batch_size=64, loss="hinge", iterations=100_000,
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
