"""Small shared pieces of the benchmarks: the machine, logged commands measured from outside, reports.

- `machine_info` / `machine`: what ran the numbers (CPU, cores, memory, package versions), as a
  dict for JSON and as one line for a report; `LoadWatch` the load average seen meanwhile.
- `run_logged`: a command with its output in a log file and a timeout; `StepFailed` names the log
  and the last error line. `run_measured` (below) also polls memory.
- `read_json`, `markdown_table`, `median_and_spread`, `write_report` (markdown + JSON side by side).

`run_measured` runs a command with its output in a log file, polls the anonymous and resident
memory of its whole process tree from /proc (so a tool's own accounting is not trusted), stops it at
a time limit, at a memory cap (so an out-of-memory run cannot take the machine down), or when a log
line says it has gone far enough.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import shlex
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


def machine_info(packages: tuple[str, ...] = ("torch",)) -> dict:
    """CPU model and flags that matter here, cores (and how many this process may use), memory,
    Python and the given packages' versions."""
    cpu, flags = platform.processor() or "cpu", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("cpu", platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in have]
                break
    except OSError:
        pass
    try:
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1)
    except (OSError, ValueError):
        memory_gib = None
    versions = {}
    for dist in packages:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "memory_gib": memory_gib, "python": platform.python_version(), **versions}


def machine(packages: tuple[str, ...] = ("torch",)) -> str:
    """`machine_info` in one line."""
    m = machine_info(packages)
    flags = f" ({' '.join(m['cpu_flags'])})" if m["cpu_flags"] else ""
    cores = f"{m['cores']} cores" + (f" ({m['usable_cores']} usable)" if m["usable_cores"] != m["cores"] else "")
    versions = ", ".join(f"{p} {m[p]}" for p in packages)
    return f"{m['cpu']}{flags}, {cores}, {m['memory_gib']:.0f} GiB memory, {versions}, Python {m['python']}"


class LoadWatch:
    """The 1-minute load average, sampled at the caller's steps: a range above the cores a
    benchmark uses means other jobs shared the machine."""

    def __init__(self):
        self.seen = [os.getloadavg()[0]]

    def sample(self) -> None:
        self.seen.append(os.getloadavg()[0])

    def describe(self) -> str:
        return f"1-min load average seen {min(self.seen):.1f} to {max(self.seen):.1f}"


class StepFailed(RuntimeError):
    """A benchmark step failed; the message names its log."""


def run_logged(cmd: list[str], log_path: Path, timeout: float, env: dict | None = None) -> float:
    """Run cmd with stdout+stderr into log_path, in its own process group; its wall seconds.
    StepFailed on a non-zero exit (naming the last error line) or on the timeout (the group is
    stopped, also when the caller is interrupted)."""
    from signround_vllm.server import stop_process_group

    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as f:
        f.write(f"$ {shlex.join(map(str, cmd))}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process_group(proc, 20)
            raise StepFailed(f"timed out after {timeout:.0f} s (log: {log_path})") from None
        except BaseException:  # interrupted: leave nothing running
            stop_process_group(proc, 20)
            raise
    if code != 0:
        raise StepFailed(f"exited with code {code}: {last_error_line(log_path)} (log: {log_path})")
    return time.perf_counter() - t0


def last_error_line(log_path: Path) -> str:
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    for ln in reversed(lines):
        if re.search(r"(Error|Exception|error:)", ln) and "Failed to import Triton kernels" not in ln:
            return ln[-300:]
    return lines[-1][-300:] if lines else "(empty log)"


def read_json(path: Path):
    """The JSON in path, or None if it is missing or unreadable (a step that did not finish)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def median_and_spread(values: list[float]) -> tuple[float, float] | None:
    """(median, spread) of repeated measurements; spread = (max - min) / median (0 for one value)."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    median = values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
    return median, ((values[-1] - values[0]) / median if median else 0.0)


def mean_of(values) -> float | None:
    """Mean of the values that are not None (None if there are none)."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def run_perplexity(run: dict, tool: str, text: str, served: bool) -> float | None:
    """One tool's perplexity of one text in a run of benchmarks/quality.py (a row of its report's "runs"):
    as served by vLLM (when measured) or by transformers."""
    if served:
        return run.get("served", {}).get(tool, {}).get("perplexity", {}).get(text)
    return run.get(tool, {}).get(text)


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a pipe table (cells may not hold '|': it is replaced by '/')."""
    clean = lambda cells: "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"  # noqa: E731
    return [clean(header), "|" + "---|" * len(header), *(clean(r) for r in rows)]


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def bar_chart(ax, names: list[str], series: dict[str, list[float | None]], ylabel: str, title: str) -> None:
    """Grouped bars: one group per name, one bar per series (a missing value draws as 0)."""
    width = 0.8 / max(len(series), 1)
    for i, (label, vals) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [0 if x is None else x for x in vals], width, label=label)
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)


def write_report(folder: Path, name: str, markdown: str, payload: dict | None = None) -> list[Path]:
    """<folder>/<name>.md and, with a payload, <name>.json (numbers for scripts); the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.md"]
    paths[0].write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    if payload is not None:
        paths.append(folder / f"{name}.json")
        paths[1].write_text(json.dumps(payload, indent=1, default=str))
    return paths


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
                 poll_s: float = 0.05, cwd: Path | None = None) -> Measured:
    """Run cmd (output to log_path), measuring peak memory of its process tree; see module doc."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    stopped: list[str] = []
    with open(log_path, "w") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True, cwd=cwd)

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
