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


@pytest.mark.parametrize("pool", [True, False])
def test_attention_uses_the_fused_sdpa_kernel_not_the_math_fallback(pool):
    """SDPA silently falls back to its math kernel (which builds the N x N map) when q/k and v head sizes differ:
    check the kernel torch actually ran, forward and backward."""
    from torch.profiler import ProfilerActivity, profile

    from sagan.layers import SelfAttention2d

    torch.manual_seed(0)
    m = SelfAttention2d(64, pool=pool)
    x = torch.randn(2, 64, 16, 16, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        m(x).sum().backward()
    ops = {e.key for e in prof.key_averages()}
    fused = {op for op in ops if "scaled_dot_product" in op and ("flash" in op or "efficient" in op)}
    assert fused, sorted(op for op in ops if "scaled_dot_product" in op)
    assert not any("math" in op for op in ops if "scaled_dot_product" in op)
    assert not any(op in ops for op in ("aten::softmax", "aten::_softmax"))  # no explicit attention map


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


def _fp16_trainer(tmp_path, max_steps: int):
    """fp16 autocast with a GradScaler on the CPU (Lightning maps '16-mixed' to bf16 on CPUs, so built by hand)."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**4))
    trainer = pl.Trainer(accelerator="cpu", plugins=[plugin], max_steps=max_steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    return trainer, plugin.scaler


def test_fp16_gradscaler_overflow_is_skipped_not_divergence(tmp_path):
    torch.manual_seed(0)
    model = SAGAN(resolution=32, img_channels=3, num_classes=0, z_dim=16, g_ch=8, d_ch=8, g_attn=[16], d_attn=[16])
    calls = {"n": 0}

    def overflow_once(grad):  # the second D backward overflows, as fp16 gradients do now and then
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 2 else grad

    model.discriminator.linear.parametrizations.weight.original.register_hook(overflow_once)
    trainer, scaler = _fp16_trainer(tmp_path, max_steps=8)
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    trainer.fit(model, DataLoader(TensorDataset(x, torch.zeros(8, dtype=torch.long)), batch_size=4))
    assert model.g_steps == 4  # trained on after the overflow (the divergence guard did not stop it)
    assert model.counters.amp_skipped_steps == 1 and model.counters.skipped_steps == 0
    assert scaler.get_scale() == 2.0**3  # the scaler skipped that step and halved its scale
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_nonfinite_loss_is_still_divergence(tmp_path, monkeypatch):
    import sagan.module
    from sagan.checkpointing import DivergenceError
    from sagan.losses import d_hinge, g_hinge

    monkeypatch.setattr(sagan.module, "get_losses", lambda name: (lambda r, f: d_hinge(r, f) * float("nan"), g_hinge))
    model = SAGAN(resolution=32, img_channels=3, num_classes=0, z_dim=16, g_ch=8, d_ch=8, g_attn=[16], d_attn=[16])
    trainer, _ = _fp16_trainer(tmp_path, max_steps=4)
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    with pytest.raises(DivergenceError, match="training diverged"):
        trainer.fit(model, DataLoader(TensorDataset(x, torch.zeros(8, dtype=torch.long)), batch_size=4))


def test_spectral_norm_runs_in_float32_under_autocast(monkeypatch):
    """CPU autocast keeps mv in float32 anyway, so check what the CUDA case depends on: autocast is off inside."""
    from sagan.layers import sn_conv2d

    seen = []
    real_mv = torch.mv

    def spy(a, b):
        seen.append((torch.is_autocast_enabled("cpu"), a.dtype))
        return real_mv(a, b)

    conv = sn_conv2d(8, 16).train()
    monkeypatch.setattr(torch, "mv", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = conv.weight
    assert seen and all(not enabled and dtype == torch.float32 for enabled, dtype in seen)
    assert w.dtype == torch.float32
