"""benchmarks/serving.py end to end in its short --tiny mode: every cell of its report is filled.

The tiny mode serves a 2-layer random Llama (with the SmolLM2 tokenizer) in bf16, SignRound,
GPTQ and AWQ at 4 bits and SignRound at 3 and 2 bits, with tiny lengths, a few requests and one
concurrency. It starts about ten vLLM engines (three processes each import vLLM), so it takes
minutes, most of it start-up: a few on an idle 2-core machine, longer when other jobs share it.
"""
import importlib.util
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 1800  # a hung step is cut by the benchmark's own per-step timeouts well before this


def markdown_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """(header cells, body rows) of every pipe table in a markdown text."""
    tables, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            assert len(block) >= 2 and set("".join(block[1])) <= set("-:"), f"malformed table: {block[:2]}"
            tables.append((block[0], block[2:]))
            block = []
    return tables


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("serving-bench")
    cmd = [sys.executable, str(REPO / "benchmarks" / "serving.py"), "--tiny",
           "--results", str(out / "results"), "--work", str(out / "work")]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO, check=False)
    seconds = time.perf_counter() - t0
    print(f"\nserving benchmark --tiny: {seconds / 60:.1f} min, exit code {done.returncode}")
    report_path = out / "results" / "serving-tiny.md"
    assert report_path.is_file(), f"no report; exit code {done.returncode}; stderr:\n{done.stderr[-4000:]}"
    report = report_path.read_text()
    data = json.loads((out / "results" / "serving-tiny.json").read_text())
    return done, report, data, out


def test_tiny_benchmark_runs_and_every_cell_is_filled(tiny_run):
    done, report, data, _ = tiny_run
    failures = {v["name"]: v["errors"] for v in data["variants"]
                if any(not m.startswith("refused by export") for m in v["errors"].values())}
    assert not failures, f"failed steps: {json.dumps(failures, indent=1)}\n\n{report}"
    assert done.returncode == 0, done.stderr[-4000:]
    tables = markdown_tables(report)
    assert len(tables) == 5, f"expected 5 tables (weights, offline, online, ratios, bit widths):\n{report}"
    for header, rows in tables:
        assert rows, f"table {header} has no rows"
        for row in rows:
            assert len(row) == len(header), f"row {row} does not match header {header}"
            empty = [h for h, c in zip(header, row) if not c]
            assert not empty, f"empty cells {empty} in row {row}"
            failed = [h for h, c in zip(header, row) if "FAILED" in c]
            assert not failed, f"failed cells {failed} in row {row}"
    # One row per format in the first three tables (the online one per format and concurrency).
    formats = ["bf16", "SignRound W4G128sym", "SignRound W4G128sym (vllm forced)", "GPTQ W4G128sym", "AWQ W4G128sym"]
    assert [r[0] for r in tables[0][1]] == formats
    assert [r[0] for r in tables[1][1]] == formats
    assert [r[0] for r in tables[2][1]] == formats
    # ratios: every other format against bf16, GPTQ and AWQ
    assert [(r[0], r[1]) for r in tables[3][1]][:3] == [("bf16", "vs GPTQ W4G128sym"), ("bf16", "vs AWQ W4G128sym"),
                                                        ("SignRound W4G128sym", "vs bf16")]
    assert all(re.fullmatch(r"\d+\.\d\dx", c) for r in tables[3][1] for c in r[2:])
    assert [r[0] for r in tables[4][1]] == ["16", "4", "3"]
    assert "python benchmarks/serving.py --tiny" in report


def test_tiny_benchmark_numbers_are_sane(tiny_run):
    _, report, data, _ = tiny_run
    v = {x["name"]: x for x in data["variants"]}
    for name in ("bf16", "signround", "signround-vllm", "gptq", "awq"):
        r = v[name]["results"]
        for bs, lat in r["latency"].items():
            assert lat["e2e_s"] > 0 and lat["prefill_s"] > 0, (name, bs, lat)
        assert r["throughput"]["requests_per_s"] > 0
        for c, serve in r["serve"].items():
            assert serve["request_throughput"] > 0 and serve["p50_ttft_ms"] > 0, (name, c, serve)
        assert math.isfinite(r["ppl_served"]) and r["ppl_served"] > 1
        assert r["loaded_bytes"] > 0 and r["disk_bytes"] > 0
    # The three 4-bit formats hold the very same integers and scales: same served perplexity.
    ppl = {n: v[n]["results"]["ppl_served"] for n in ("signround", "gptq", "awq")}
    assert max(ppl.values()) / min(ppl.values()) - 1 < 1e-3, ppl
    # 4-bit weights take less room than bf16, on disk and loaded (the bf16 embedding is shared by all).
    for n in ("signround", "gptq", "awq"):
        assert v[n]["results"]["disk_bytes"] < v["bf16"]["results"]["disk_bytes"]
        assert v[n]["results"]["loaded_bytes"] < v["bf16"]["results"]["loaded_bytes"]
    # The bit-width part: 2 and 3 bits are served by SignRound, and the exporter's refusal is recorded.
    for bits in ("3",):  # the tiny run's lower bit widths (2 bits takes the same path)
        for fmt in ("gptq", "awq"):
            answer = data["export_answers"][bits][fmt]
            assert answer.startswith("refused by export:") and f"{bits}-bit" in answer, answer
        served = v[f"signround-W{bits}G128sym"]["results"]
        assert math.isfinite(served["ppl_served"]) and served["completions"]
    # Served correctly: each SignRound checkpoint's served perplexity matches its weights in transformers.
    for name, x in v.items():
        if name.startswith("signround"):
            r = x["results"]
            assert abs(r["ppl_served"] / r["ppl_reference"] - 1) < 0.03, (name, r["ppl_served"], r["ppl_reference"])
    assert re.search(r"\| 3 \| SignRound W3G128sym \|.*refused by export: GPTQ", report)


def test_tiny_benchmark_chooses_and_forces_kernels(tiny_run):
    from signround_vllm.kernels import default_order

    order = default_order("cpu")  # cpu_int4 first, or vLLM's CPUWNA16 on AMX CPUs
    v = {x["name"]: x["results"] for x in tiny_run[2]["variants"]}

    def ours(variant):  # the plugin's kernel names in the log ("vllm (CPUWNA16LinearKernel)": "vllm")
        return {k.split(" ")[0] for k in v[variant]["kernels"].split(", ") if k.split(" ")[0] in order}

    assert ours("signround") == {order[0]}
    assert "vllm (CPUWNA16LinearKernel)" in v["signround-vllm"]["kernels"]
    assert ours("signround-vllm") == {"vllm"}
    assert ours("signround-W3G128sym") == {next(n for n in order if n != "vllm")}  # 3 bits


def test_tiny_benchmark_resumes_without_measuring_again(tiny_run):
    _, _, data, out = tiny_run
    cmd = [sys.executable, str(REPO / "benchmarks" / "serving.py"), "--tiny", "--resume", "--name", "resumed",
           "--results", str(out / "results"), "--work", str(out / "work")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "quantizing" not in done.stderr and "starting `" not in done.stderr  # no checkpoint, no engine
    resumed = json.loads((out / "results" / "resumed.json").read_text())
    before = {x["name"]: x["results"] for x in data["variants"]}
    for x in resumed["variants"]:
        r = x["results"]
        assert r.get("latency") == before[x["name"]].get("latency"), x["name"]
        assert r.get("serve") == before[x["name"]].get("serve"), x["name"]


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed: no plots")
def test_tiny_benchmark_plots(tiny_run):
    data = tiny_run[2]
    plots = data["info"]["plots"]
    assert len(plots) == 2
    for p in plots:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
