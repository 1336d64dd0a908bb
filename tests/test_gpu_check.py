"""The GPU check's whole pipeline, run small on CPU under the Triton interpreter so that it cannot rot."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny_runs_every_step(tmp_path):
    report = tmp_path / "gpu_check.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--out", str(report)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = report.read_text()
    for heading in ("## 1. Correctness", "## 2. The tuner on cpu", "## 3. Timing"):
        assert heading in text, text
    assert "24 cases, 0 failed." in text
    # Every bit width was timed, beside bf16, on both tiny shapes and both batch sizes.
    rows = [line for line in text.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 4 and all(cell.strip() for row in rows for cell in row.split("|")[4:9]), rows
    assert "| signround |" in text and "block loss" in text


def test_gpu_check_refuses_without_a_gpu_unless_tiny(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the check would run")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--steps", "timing"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and "no CUDA GPU here" in proc.stderr
