"""Every fast path agrees with eager float32 NCHW within a stated tolerance; nothing quadratic on the training path."""

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from sagan.models import Discriminator, Generator
from sagan.module import SAGAN


def _nets(res: int = 32):
    torch.manual_seed(0)
    g = Generator(res, z_dim=16, ch=8, num_classes=5, attn_resolutions=[16]).eval()
    d = Discriminator(res, ch=8, num_classes=5, attn_resolutions=[16]).eval()
    for m in (g, d):
        for a in m.attn.values():
            with torch.no_grad():
                a.gamma.fill_(0.8)  # attention really contributes
    z, y = torch.randn(6, 16), torch.arange(6) % 5
    return g, d, z, y


def test_channels_last_matches_nchw():
    g, d, z, y = _nets()
    ref_img = g(z, y)
    ref_logits = d(ref_img, y)
    g.to(memory_format=torch.channels_last)
    d.to(memory_format=torch.channels_last)
    img = g(z, y)
    logits = d(img.contiguous(memory_format=torch.channels_last), y)
    # same arithmetic in another memory layout: only summation order inside the convolutions differs
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-5)


def test_bf16_autocast_close_to_fp32():
    g, d, z, y = _nets()
    ref_img = g(z, y)
    ref_logits = d(ref_img, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img = g(z, y)
        logits = d(ref_img, y)
    # bfloat16 keeps 8 bits of mantissa (relative precision 2^-8 ~ 4e-3 per op); through ~10 layers errors add up
    # to a few 1e-2 on images in [-1, 1] and on logits relative to their spread
    assert (img.float() - ref_img).abs().max() < 5e-2
    assert (logits.float() - ref_logits).abs().max() < 5e-2 * (1 + ref_logits.abs().max())
    assert torch.isfinite(img).all() and torch.isfinite(logits).all()


@pytest.mark.timeout(600)
def test_torch_compile_matches_eager():
    g, d, z, y = _nets()
    ref = d(g(z, y), y)
    cg, cd = torch.compile(g), torch.compile(d)
    out = cd(cg(z, y), y)
    # the same graph with fused kernels: float32 reassociation only
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def _fit(tmp_path, **kw) -> SAGAN:
    torch.manual_seed(0)
    model = SAGAN(resolution=32, img_channels=3, num_classes=0, z_dim=16, g_ch=8, d_ch=8, g_attn=[16], d_attn=[16],
                  **{k: v for k, v in kw.items() if k != "precision"})
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         precision=kw.get("precision", "32-true"))
    trainer.fit(model, DataLoader(TensorDataset(x, torch.zeros(8, dtype=torch.long)), batch_size=4))
    return model


@pytest.mark.parametrize("kw", [dict(channels_last=True), dict(precision="bf16-mixed")], ids=["channels_last", "bf16"])
def test_training_with_fast_paths_runs_and_stays_finite(tmp_path, kw):
    model = _fit(tmp_path, **kw)
    assert model.g_steps == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if kw.get("channels_last"):
        w = model.generator.blocks[0].conv1.parametrizations.weight.original
        assert w.is_contiguous(memory_format=torch.channels_last)


def test_training_path_never_builds_the_attention_map(tmp_path, monkeypatch):
    """The N x N map exists only when asked for (return_attention=True): training goes through SDPA."""
    calls = []
    real_softmax = torch.softmax

    def spy(*a, **k):
        calls.append(a[0].shape)
        return real_softmax(*a, **k)

    monkeypatch.setattr(torch, "softmax", spy)
    _fit(tmp_path)
    assert calls == []
