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
    headings = ("## 1. Correctness", "## 2. The tuner on cpu", "## 3. Timing", "## 4. Mixture of experts")
    assert all(h in text for h in headings) and sorted(headings, key=text.index) == list(headings), text
    assert "24 cases, 0 failed." in text
    # Every bit width was timed, beside bf16, on both tiny shapes and both batch sizes.
    rows = [line for line in text.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 4 and all(cell.strip() for row in rows for cell in row.split("|")[4:9]), rows
    assert "| signround |" in text and "block loss" in text
    # The experts: the operator and the checked entry against the reference at every bit width, then timed at
    # every bit width and bf16 (torch's grouped GEMM, checked against a loop of matmuls) at both batch sizes.
    moe = text[text.index("## 4. Mixture of experts"):]
    assert "4 MoE cases, 0 failed" in moe and all(f"| W{b}G32" in moe for b in (2, 3, 4, 8)), moe
    timed = [row.split("|")[3:7] for row in moe.splitlines() if row.startswith("| tiny-moe | 8x64x32")]
    assert sorted((m.strip(), w.strip()) for m, w, _, us in timed if float(us)) == sorted(
        (m, w) for m in ("1", "2") for w in ("W2", "W3", "W4", "W8", "bf16 (grouped)")), timed


def test_gpu_check_refuses_without_a_gpu_unless_tiny(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the check would run")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--steps", "timing"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and "no CUDA GPU here" in proc.stderr
