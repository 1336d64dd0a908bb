"""Test-wide environment: offline, small vLLM footprint, in-process engine, temp files inside the repo."""
import os
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CACHE_ROOT": str(_ROOT / ".cache" / "vllm"),
    "TOKENIZERS_PARALLELISM": "false",
}
for _k, _v in _DEFAULTS.items():
    os.environ.setdefault(_k, _v)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def calibration_text(tmp_path_factory):
    """40,000 characters of the built-in Wikipedia calibration split, as a text file."""
    from offline_tuner.text_data import wikipedia_text

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(wikipedia_text("calibration")[:40000])
    return path


# The largest test (tests/test_memory_bound.py) writes a 1.4 GB model and its checkpoint; vLLM, Triton and
# Inductor caches come on top. Refuse to start, with the reason, rather than fail dozens of tests midway.
NEEDED_FREE_DISK = 3 * 2**30


def pytest_sessionstart(session):
    import shutil
    import tempfile

    folder = tempfile.gettempdir()
    free = shutil.disk_usage(folder).free
    if free < NEEDED_FREE_DISK:
        pytest.exit(f"only {free / 2**30:.1f} GiB free on the disk of {folder}; the test suite needs about "
                    f"{NEEDED_FREE_DISK / 2**30:.0f} GiB there (set TMPDIR to a folder on a larger disk)",
                    returncode=1)
