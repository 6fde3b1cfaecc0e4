"""The CUDA paths, on a GPU: `make test-gpu` (pytest -m gpu). Skipped, with the reason, where CUDA is absent.

One training iteration in float32, bf16-mixed, 16-mixed (GradScaler) and compiled, channels_last; spectral norm's
sigma in float32 under CUDA autocast; SDPA on a fused kernel (attention memory linear in positions); batched
generation equal to per-image generation; FID features on the GPU equal to the CPU's; a 1-process NCCL DDP fit
with SyncBatchNorm; kill + resume on the GPU.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: these tests need a GPU (make test-gpu)"),
]

from conftest import REPO  # noqa: E402


def _model(**kw):
    from sagan.module import SAGAN

    torch.manual_seed(0)
    args = dict(resolution=32, img_channels=3, num_classes=10, z_dim=32, g_ch=16, d_ch=16, g_attn=[16], d_attn=[16])
    args.update(kw)
    return SAGAN(**args)


def _loader(n: int = 32, batch: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8).float() / 127.5 - 1
    return DataLoader(TensorDataset(x, torch.randint(0, 10, (n,), generator=g)), batch_size=batch)


class _Seen(pl.Callback):
    """What the networks looked like during training (Lightning moves the module back to the CPU and reverts
    SyncBatchNorm when fit ends)."""

    def __init__(self) -> None:
        self.devices: set[str] = set()
        self.sync_bn = False
        self.channels_last = False

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.devices |= {p.device.type for p in module.parameters()}
        self.sync_bn = any(isinstance(m, torch.nn.SyncBatchNorm) for m in module.generator.modules())
        w = module.generator.blocks[0].conv1.parametrizations.weight.original
        self.channels_last = w.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("precision,compile_", [("32-true", False), ("bf16-mixed", False), ("16-mixed", False),
                                               ("bf16-mixed", True)], ids=["fp32", "bf16", "fp16", "compiled"])
def test_training_iteration_on_the_gpu(tmp_path, precision, compile_):
    model, seen = _model(compile=compile_), _Seen()
    before = {k: v.clone() for k, v in model.generator.state_dict().items()}
    trainer = pl.Trainer(accelerator="gpu", devices=1, precision=precision, max_steps=6, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[seen])
    trainer.fit(model, _loader())
    assert model.g_steps == 3 and seen.devices == {"cuda"} and seen.channels_last
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(v, before[k]) for k, v in model.generator.state_dict().items())  # G was trained
    # one EMA update per G step that ran (fp16: the GradScaler skips the G steps its first scales overflow)
    n_ema = int(model.g_ema.n_averaged)
    assert n_ema == 3 if precision != "16-mixed" else 1 <= n_ema <= 3
    assert model.g_ema.n_averaged.device.type == "cpu"
    if precision == "16-mixed":
        assert getattr(trainer.precision_plugin, "scaler", None) is not None


@pytest.mark.parametrize("options", [{}, dict(class_weight=0.5, class_twin=True, mode_seeking=0.3,
                                              augment="translation,cutout,color", lecam_weight=0.3),
                                     dict(mode_seeking=3.0, mode_seeking_form="match_real")],
                         ids=["paper", "small-data options", "match_real"])
def test_a_training_iteration_reads_the_gpu_once_per_optimizer_step(tmp_path, options):
    """Host-device synchronisations inside ``training_step`` (torch.cuda.set_sync_debug_mode), after two warm-up
    batches: only the divergence guard's finiteness check, one per optimizer step (2 per iteration). Each extra read
    makes the host wait for every queued kernel and leaves the GPU idle while the next ones are launched."""
    import traceback
    import warnings

    model = _model(**options)
    step, events = model.training_step, []

    def audited(batch, batch_idx):
        if not 2 <= batch_idx < 6:  # warm-up batches; the last one also logs (self.log copies to the GPU)
            return step(batch, batch_idx)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda msg, *a, **k: (events.append(
                f"{msg}\n" + "".join(traceback.format_stack(limit=6)[:-1]))
                if "called a synchronizing CUDA operation" in str(msg) else None)  # not the mode's own notice
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return step(batch, batch_idx)
            finally:
                torch.cuda.set_sync_debug_mode(0)

    model.training_step = audited
    trainer = pl.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=14, logger=False,
                         log_every_n_steps=100, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, _loader(n=64))
    assert model.g_steps == 7
    assert len(events) <= 2 * 4, "\n".join(events)  # 4 audited iterations


def test_spectral_norm_sigma_is_float32_under_cuda_autocast():
    from sagan.layers import sn_conv2d

    conv = sn_conv2d(64, 128).cuda().train()
    for _ in range(20):
        conv(torch.randn(1, 64, 8, 8, device="cuda"))
    conv.eval()
    ref = conv.weight.detach().clone()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        w = conv.weight
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, ref, rtol=0, atol=0)  # bf16 power iteration would differ at ~1e-3


def _attention_peak(n_side: int) -> int:
    from sagan.layers import SelfAttention2d

    m = SelfAttention2d(64).cuda()
    x = torch.randn(4, 64, n_side, n_side, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    m(x).sum().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_sdpa_attention_memory_grows_linearly_with_positions():
    """4x the positions (64x64 -> 128x128 feature maps): about 4x the memory with a fused kernel, 16x with an
    explicit N x N map."""
    small, large = _attention_peak(64), _attention_peak(128)
    assert large / small < 6.0, (small, large)


def test_batched_gpu_generation_equals_per_image_generation():
    from sagan.models import Generator

    torch.manual_seed(0)
    g = Generator(32, z_dim=32, ch=16, num_classes=10).cuda().eval()
    z, y = torch.randn(16, 32, device="cuda"), torch.arange(16, device="cuda") % 10
    with torch.no_grad():
        batched = g(z, y)
        single = torch.cat([g(z[i:i + 1], y[i:i + 1]) for i in range(16)])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)


def test_fid_features_on_the_gpu_equal_the_cpus(tmp_path):
    from sagan import metrics as M
    from sagan.data import SAGANData
    from sagan.models import Generator

    torch.manual_seed(0)
    g = Generator(32, z_dim=16, ch=8, num_classes=10, img_channels=1).eval()
    ref = SAGANData("digits", resolution=32).build_dataset("train")
    out = {}
    for device in ("cpu", "cuda"):
        ev = M.Evaluator("digits-mlp", "fid,prc", device=device)
        ev.load_reference(ref, num_classes=10)
        out[device] = ev.generator(g.to(device), 500, seed=0).values
    for k in out["cpu"]:
        assert out["cuda"][k] == pytest.approx(out["cpu"][k], rel=1e-3, abs=1e-4), k


def test_one_process_nccl_ddp_with_sync_batchnorm(tmp_path):
    from sagan.strategy import GANDDPStrategy

    model, seen = _model(), _Seen()
    trainer = pl.Trainer(accelerator="gpu", devices=1, strategy=GANDDPStrategy(process_group_backend="nccl"),
                         sync_batchnorm=True, max_steps=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[seen])
    trainer.fit(model, _loader())
    assert model.g_steps == 2 and seen.devices == {"cuda"} and seen.sync_bn


@pytest.mark.timeout(600)
def test_kill_and_resume_on_the_gpu(tmp_path):
    """Deterministic cuDNN: the resumed run ends bitwise equal to an uninterrupted one (see BENCHMARKS.md for
    what determinism costs)."""
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8", SAGAN_PROGRESS="lines")
    fit = [sys.executable, "-m", "sagan.cli", "fit", "--config", str(REPO / "configs/digits.yaml"),
           "--output_root", str(tmp_path), "--trainer.accelerator", "gpu", "--trainer.deterministic", "true",
           "--trainer.logger", "false", "--fid.every_n_steps", "0", "--attention_maps.every_n_steps", "0",
           "--samples.every_n_steps", "0", "--trainer.max_steps", "120", "--checkpoint.every_n_train_steps", "2"]
    assert subprocess.run([*fit, "--experiment", "ref"], env=env, capture_output=True, timeout=300).returncode == 0
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([*fit, "--experiment", "run"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t = time.time()
    while time.time() - t < 240 and not last.exists():
        time.sleep(0.2)
    time.sleep(2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert subprocess.run([*fit, "--experiment", "run", "--ckpt_path", "last"], env=env, capture_output=True,
                          timeout=300).returncode == 0
    a = torch.load(tmp_path / "ref/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"]
    for k, v in a["state_dict"].items():
        if torch.is_tensor(v):
            assert torch.equal(v, b["state_dict"][k]), k
