"""Small shared pieces of the benchmarks: the machine, logged commands measured from outside, reports.

`run_measured` runs a command with its output in a log file, polls the anonymous and resident
memory of its whole process tree from /proc (so a tool's own accounting is not trusted), stops it at
a time limit, at a memory cap (so an out-of-memory run cannot take the machine down), or when a log
line says it has gone far enough.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

GiB = 2**30
REPO = Path(__file__).resolve().parents[1]


def use_checkout_packages() -> None:
    """Make this checkout importable without installing it (a GPU machine has no package index): the
    repository root on sys.path, and the kernel folder under its import name `signround_triton`."""
    import importlib.util

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if "signround_triton" in sys.modules or importlib.util.find_spec("signround_triton") is not None:
        return
    folder = REPO / "triton_kernels"
    spec = importlib.util.spec_from_file_location("signround_triton", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["signround_triton"] = module
    spec.loader.exec_module(module)


def log(tag: str, msg: str) -> None:
    print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> str:
    """CPU model, cores, memory, torch and Python versions, in one line."""
    import torch

    cpu = platform.processor() or "cpu"
    mem = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        mem = f", {total / GiB:.0f} GiB memory"
    except (OSError, ValueError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, torch {torch.__version__}, Python {platform.python_version()}"


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _memory_kib(pid: int) -> tuple[int, int]:
    """(RssAnon, VmRSS) of the process tree in KiB."""
    anon = rss = 0
    for p in _tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    anon += int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
        except OSError:
            pass
    return anon, rss


@dataclasses.dataclass
class Measured:
    seconds: float
    peak_anon_bytes: int
    peak_rss_bytes: int
    returncode: int | None
    stopped: str | None  # why it was stopped early: "timeout", "memory cap", "enough"; None if it ended by itself

    @property
    def ok(self) -> bool:
        return self.returncode == 0 or self.stopped == "enough"


def run_measured(cmd: list[str], log_path: Path, timeout_s: float, memory_cap_bytes: int | None = None,
                 enough: Callable[[str], bool] | None = None, env: dict | None = None,
                 poll_s: float = 0.05) -> Measured:
    """Run cmd (output to log_path), measuring peak memory of its process tree; see module doc."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    stopped: list[str] = []
    with open(log_path, "w") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)

        def pump():
            for line in proc.stdout:
                f.write(line)
                f.flush()
                if enough is not None and not stopped and enough(line):
                    stopped.append("enough")
                    _kill(proc)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        peak_anon = peak_rss = 0
        while proc.poll() is None:
            anon, rss = _memory_kib(proc.pid)
            peak_anon, peak_rss = max(peak_anon, anon * 1024), max(peak_rss, rss * 1024)
            if memory_cap_bytes is not None and anon * 1024 > memory_cap_bytes and not stopped:
                stopped.append("memory cap")
                _kill(proc)
            if time.monotonic() - t0 > timeout_s and not stopped:
                stopped.append("timeout")
                _kill(proc)
            time.sleep(poll_s)
        reader.join(timeout=10)
        seconds = time.monotonic() - t0
        f.write(f"\n# exit {proc.returncode}, {seconds:.1f} s, stopped: {stopped[0] if stopped else 'no'}\n")
    return Measured(seconds, peak_anon, peak_rss, proc.returncode, stopped[0] if stopped else None)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def idle_baseline_bytes(python: str, imports: str) -> int:
    """Peak anonymous memory of an interpreter that only imports `imports` (a comma-separated list)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        m = run_measured([python, "-c", f"import {imports}; import time; time.sleep(0.5)"], Path(tmp) / "log",
                         timeout_s=300)
    return m.peak_anon_bytes
