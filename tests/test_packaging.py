"""How the project installs: import names that cannot shadow other packages."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib.util, json
import signround_triton.dequant_gemm, signround_triton.ops, signround_vllm, offline_tuner
clash = importlib.util.find_spec("triton_kernels")
print(json.dumps({"kernels": signround_triton.dequant_gemm.__file__,
                  "triton_kernels": clash.origin if clash else None}))
"""


def test_kernels_install_as_signround_triton_and_leave_triton_kernels_free(tmp_path):
    """vLLM imports any importable `triton_kernels` as OpenAI's MXFP4 kernels; ours must not be it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(found["kernels"]).resolve() == ROOT / "triton_kernels" / "dequant_gemm.py"
    origin = found["triton_kernels"]
    assert origin is None or not Path(origin).resolve().is_relative_to(ROOT), origin
