"""scripts/benchmark.py on the no-CUDA path: the train case (timing, FLOPs, profile) and the profile's kernel kinds."""

import json
import os
import subprocess
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import benchmark  # noqa: E402


def test_train_case_reports_speed_flops_and_a_profile(tmp_path):
    prof = tmp_path / "profile.txt"
    r = subprocess.run([sys.executable, str(REPO / "scripts/benchmark.py"), "_train_case", "--res", "32", "--mode",
                        "bf16", "--iters", "2", "--warmup", "1", "--batch-size", "2", "--profile", str(prof)],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["images_s"] > 0 and d["iter_s"] > 0
    # FLOPs of one iteration at batch 2: linear in the batch, 157.1 GFLOP at batch 8 for these widths
    assert abs(d["flops"] / 1e9 - 157.1 / 4) < 0.5, d["flops"]
    text = prof.read_text()
    assert text.startswith("profile: 32x32, mode bf16, batch 2, 2 iterations") and "aten::" in text


def test_profile_kernel_kinds():
    assert benchmark._kernel_kind("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == \
        "convolution (cuDNN)"
    assert benchmark._kernel_kind("nvjet_tst_128x64_64x8_1x2_h_bz_coopA_NNT") == "matrix multiply (cuBLAS)"
    assert benchmark._kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == \
        "matrix multiply (cuBLAS)"
    assert benchmark._kernel_kind("void at::native::batch_norm_collect_statistics_channels_last_kernel") == \
        "batch norm"
    assert benchmark._kernel_kind("void at::native::(anonymous namespace)::multi_tensor_apply_kernel") == \
        "optimizer (foreach Adam, EMA)"
    assert benchmark._kernel_kind("Memcpy DtoH (Device -> Pageable)") == "copies / layout"
    assert benchmark._kernel_kind("void at::native::vectorized_elementwise_kernel<4, GeluFunctor>") == \
        "elementwise and other"


def test_ema_section_times_both_configs_and_counts_operators():
    rows = benchmark.bench_ema(repeats=2)
    assert rows[0].startswith("| config |") and len(rows) == 4
    for row, config in zip(rows[2:], ["configs/digits.yaml", "configs/cifar10.yaml"], strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == config and int(cells[2]) > 10  # SN weights in G
        assert float(cells[3]) > 0 and int(cells[4]) > 10 * int(cells[2])  # ms; at least 10 ops per SN weight


def test_reference_case_reports_time_and_memory_for_both_modes():
    for mode in ("hold", "stream"):
        d = benchmark._reference_case(6000, mode)
        assert d["s"] > 0 and d["peak_mib"] >= 0
