"""`make demo`'s time budget: the fit gets what the 10 minutes leave after the install and the evaluations.

The Makefile runs against a stand-in environment whose `sagan` and `python` only record their arguments, so these
tests see the command lines `make demo` would run without installing or training anything.
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def fake_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for tool in ("sagan", "python"):
        exe = venv / "bin" / tool
        exe.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{tmp_path}/calls.txt"\n')
        exe.chmod(0o755)
    stamp = venv / ".installed"
    stamp.touch()
    later = (REPO / "pyproject.toml").stat().st_mtime + 10
    os.utime(stamp, (later, later))  # newer than pyproject.toml: make sees it installed
    return venv


def run_demo(tmp_path: Path, *overrides: str) -> tuple[str, list[str]]:
    venv = fake_venv(tmp_path)
    res = subprocess.run(["make", "-s", "-C", str(REPO), "demo", f"VENV={venv}", *overrides],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout, (tmp_path / "calls.txt").read_text().splitlines()


def max_time_seconds(fit_call: str) -> int:
    d, h, m, s = (int(v) for v in fit_call.split("--trainer.max_time ")[1].split()[0].split(":"))
    return ((d * 24 + h) * 60 + m) * 60 + s


def test_training_gets_the_budget_less_the_install_and_the_reserve(tmp_path):
    started = int(time.time()) - 200  # as if the install had taken 200 s
    out, calls = run_demo(tmp_path, f"DEMO_START={started}")
    fit, evaluate, accuracy = calls
    assert fit.startswith("sagan fit --config configs/digits.yaml")
    assert 600 - 75 - 200 - 3 <= max_time_seconds(fit) <= 600 - 75 - 200
    assert evaluate.startswith("sagan evaluate --ckpt outputs/digits/checkpoints/last.ckpt")
    assert accuracy.startswith("python scripts/digits_accuracy.py")
    assert "training for at most" in out


def test_a_budget_spent_by_the_install_still_trains_a_minute_and_says_why(tmp_path):
    out, calls = run_demo(tmp_path, f"DEMO_START={int(time.time()) - 1000}")
    assert max_time_seconds(calls[0]) == 60
    assert "less than 60 s" in out and "DEMO_BUDGET_S" in out


@pytest.mark.parametrize("value", ["null", "00:00:06:30"])
def test_demo_max_time_overrides_the_budget(tmp_path, value):
    _, calls = run_demo(tmp_path, f"DEMO_MAX_TIME={value}")
    assert calls[0].endswith(f"--trainer.max_time {value}")


def test_a_larger_budget_is_written_in_hours_and_minutes(tmp_path):
    _, calls = run_demo(tmp_path, "DEMO_BUDGET_S=7275", f"DEMO_START={int(time.time())}")
    assert 7200 - 3 <= max_time_seconds(calls[0]) <= 7200  # 00:02:00:00, not 00:00:120:00
    assert all(int(f) < 60 for f in calls[0].split("--trainer.max_time ")[1].split(":")[2:])
