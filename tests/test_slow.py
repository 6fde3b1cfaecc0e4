"""Demo-length runs with their quality thresholds (`make test-slow`; 6-11 minutes on 2 CPU cores)."""

import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

# configs/digits.yaml as it ships (1,600 iterations, seed 0) on a 2-core AMD EPYC: FID 1.86 x the floor, recall 0.84
# of the floor's, accuracy 98.2% (6 seeds: 1.37-1.88 x / 0.80-0.88 / 96.8-98.4%; BENCHMARKS.md "More iterations close
# it"); the thresholds leave room for other CPUs' float rounding, which changes the trajectory (an earlier recipe's
# seed 0 read 1.47 x / 0.77 / 98.4% on one host, 1.59 x / 0.84 / 96.6% on another). Earlier recipes: 10.6 x, then
# 4.15 x, then 2.94 x (recall 0.69 of the floor's, 96.3%), then 2.06 x (0.77, 97.7%), then 1.54 x (0.77, 98.0%), then
# 1.47 x (0.77, 98.4%), then at 1,200 iterations 1.82 x (0.78, 97.9%).
FID_RATIO_MAX = 3.0
RECALL_FRACTION_MIN = 0.65
ACCURACY_MIN = 0.94


@pytest.mark.timeout(2400)
def test_the_demo_draws_varied_and_right_digits(tmp_path):
    """`make demo`'s training, evaluation and classifier check: the final EMA generator's FID (digits-mlp, 1,000
    samples) as a multiple of the floor, its recall against the floor's, and the share of samples a classifier
    trained on real digits recognises as the digit asked for. Thresholds: the targets in README "Two commands"."""
    run = [sys.executable, "-m", "sagan.cli"]
    fit = subprocess.run([*run, "fit", "--config", str(REPO / "configs/digits.yaml"), "--output_root", str(tmp_path),
                          "--trainer.logger", "false"], capture_output=True, text=True, cwd=REPO)
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = tmp_path / "digits" / "checkpoints" / "last.ckpt"
    ev = subprocess.run([*run, "evaluate", "--ckpt", str(ckpt), "--num-samples", "1000", "--metrics", "fid,prc",
                         "--floor"], capture_output=True, text=True, cwd=REPO)
    assert ev.returncode == 0, ev.stderr[-3000:]
    out = json.loads(ckpt.with_suffix(".metrics.json").read_text())
    gen, floor = out["metrics"], out["floor"]["metrics"]
    acc = subprocess.run([sys.executable, str(REPO / "scripts/digits_accuracy.py"), str(ckpt)], capture_output=True,
                         text=True, cwd=REPO)
    assert acc.returncode == 0, acc.stderr[-3000:]
    line = next(x for x in acc.stdout.splitlines() if "recognised as the requested digit" in x)
    accuracy = float(line.split(":")[1].split("%")[0]) / 100
    ratio = gen["fid"] / floor["fid"]
    print(f"FID {gen['fid']:.3f} = {ratio:.2f} x floor; recall {gen['recall']:.3f} vs {floor['recall']:.3f}; "
          f"accuracy {accuracy:.3f}")
    assert ratio <= FID_RATIO_MAX and gen["recall"] >= RECALL_FRACTION_MIN * floor["recall"]
    assert accuracy >= ACCURACY_MIN
