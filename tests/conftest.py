"""Test-wide environment: offline, small vLLM footprint, in-process engine, temp files inside the repo, one
share of the cores per xdist worker, the longest test files first."""
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


def _pin_xdist_worker() -> None:
    """Under pytest-xdist (`-n N`, see pyproject.toml) give each worker its own share of the cores, for
    itself and every process it starts (vLLM engines, `signround quantize`). Unpinned, two workers' OpenMP
    threads and the vLLM engines that bind to a core of their own choosing crowd each other: a test of 8 s
    in one process took 98 s, and the suite gained only 10% from the second worker (29% pinned)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 0))
    if not worker or not count or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < count:
        return  # fewer cores than workers: leave the scheduler to it
    mine = cores[int(worker.removeprefix("gw")) % count::count]
    os.sched_setaffinity(0, mine)
    os.environ["OMP_NUM_THREADS"] = str(len(mine))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, mine)))


_pin_xdist_worker()


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


# The longest files (minutes each) start first, so under xdist no worker is left with one of them at the end
# while the other idles: each worker is handed whole files, about two ahead, in collection order.
LONGEST_FIRST = ("test_serving_bench.py", "test_memory_bound.py", "test_vllm_plugin.py", "test_moe.py",
                 "test_load.py", "test_families.py", "test_real_model.py", "test_export.py", "test_tuner.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
