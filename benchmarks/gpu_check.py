"""The GPU check: one command, one markdown report, for a machine with a CUDA GPU.

    python benchmarks/gpu_check.py --prepare-bundle .cache/gpu-bundle   # here, with a package index
    python benchmarks/gpu_check.py --bundle .cache/gpu-bundle --out gpu_check.md   # on the GPU machine
    python benchmarks/gpu_check.py --tiny --out report.md                # the whole pipeline on CPU (tests)

Through the device tool: run it with `carry: [".cache/gpu-bundle"]` and `--out $OUT/gpu_check.md`.

The GPU machine has torch, Triton and transformers but no vLLM, no package index and no copy of this
project installed: the check imports the project from its checkout, and whatever else it needs comes
in the bundle (about 10 MB, prepared here): wheels of gemlite (built from its sdist), auto-round 0.16.1
and what they import (auto-round's `datasets` import is stubbed: it is not used when the calibration
windows are given), SmolLM2's tokenizer and Wikipedia calibration text. Steps, each written to the
report as soon as it ends (a run cut short keeps what it measured):

1. Correctness of the Triton kernel, called as vLLM calls it (the `signround::dequant_gemm` operator)
   and through the checked entry point, against the pure-torch reference: every bit width, group size,
   symmetry, bf16 and fp16, awkward and real shapes; NaN/inf checks first.
2. The tuner on CUDA: a one-block model with the Llama-3.1-8B shapes (random weights, real text), tuned
   at the default recipe; seconds per block and peak GPU memory, ours against auto-round 0.16.1.
3. Timing at the Llama-3.1-8B and 70B layer shapes, M = 1 to 256, weights rotated over more than twice
   the L2 so every call reads from memory, CUDA-graph replays: ours at W2/W3/W4/W8 (group 128, asym),
   bf16 (cuBLAS), torch's int4 tinygemm and gemlite (W2/W4/W8), with GB/s and the share of the measured
   device copy bandwidth; the most wanted shapes first, until its share of the --minutes budget is spent.
4. Mixture of experts (the Triton fused-MoE kernel). Right after step 1, correctness: the
   `signround::fused_experts` operator (as vLLM calls it) and the checked `fused_experts` against
   `reference_experts` at every bit width, symmetry, bf16 and fp16, M = 1, 7, 64, 512 and top-k 2 and 8, on
   an awkward small layer (each bucket's first configuration forced) and Qwen3-30B-A3B's (autotuned, as
   timed); NaN/inf checks first. After step 3, until the --minutes budget ends (step 3 stops early enough to
   leave it --moe-share of the time left for timing): CUDA-graph timings of Qwen3-30B-A3B's and
   Mixtral-8x7B's expert layers, M = 1 to 256, W2/W3/W4/W8 (group 128, asym) against bf16 on the same routing
   (torch's grouped GEMM), with the GB/s of the experts the calls touch, rotated past the L2.

--tiny runs every step on CPU under the Triton interpreter with small shapes (no bundle: gemlite and
auto-round are reported as not available), so the pipeline is tested in the suite and cannot rot.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BITS = (2, 3, 4, 8)
GEMLITE_BITS = (2, 4, 8)
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# (model, K x N), most wanted first: the two bandwidth-target shapes, then the fused layers vLLM runs
# (qkv, o, gate_up, down); timing stops at the --minutes budget.
SHAPES = (("Llama-3.1-8B", 4096, 14336), ("Llama-3.1-70B", 8192, 8192),
          ("Llama-3.1-8B", 4096, 6144), ("Llama-3.1-8B", 4096, 4096), ("Llama-3.1-8B", 4096, 28672),
          ("Llama-3.1-8B", 14336, 4096), ("Llama-3.1-70B", 8192, 10240), ("Llama-3.1-70B", 8192, 57344),
          ("Llama-3.1-70B", 28672, 8192))
LLAMA_8B = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256)
TINY_MODEL = dict(hidden=128, intermediate=256, heads=4, kv_heads=2, vocab=49152)
MOE_TOKENS, MOE_TOP_K = (1, 7, 64, 512), (2, 8)  # correctness: every M with every top-k
MOE_TOLERANCE = {"float16": 5e-3, "bfloat16": 3e-2}  # max |y - ref| / max |ref|: tests/test_triton_moe.py's limits
# (model, experts, hidden, moe intermediate size I, top-k): the timed expert layers, most wanted first.
MOE_MODELS = (("Qwen3-30B-A3B", 128, 2048, 768, 8), ("Mixtral-8x7B", 8, 4096, 14336, 2))
MOE_BATCHES = (1, 4, 16, 64, 256)
BUNDLE_WHEELS = ("auto-round==0.16.1", "accelerate", "py-cpuinfo", "psutil")  # and pydantic with its own dependencies


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="write the markdown report here (rewritten after every step)")
    p.add_argument("--bundle", type=Path, help="folder made by --prepare-bundle (wheels, tokenizer, text)")
    p.add_argument("--prepare-bundle", type=Path, metavar="DIR",
                   help="make the bundle in DIR (needs a package index) and exit")
    p.add_argument("--bundle-python", default="3.12", help="Python version of the GPU machine, for binary wheels")
    p.add_argument("--tiny", action="store_true", help="small shapes on CPU under the Triton interpreter")
    p.add_argument("--minutes", type=float, default=7.0,
                   help="stop timing new cases this many minutes after the start (correctness and tuner first)")
    p.add_argument("--moe-share", type=float, default=0.4,
                   help="share of the time left for timing (after correctness and tuner) kept for the experts")
    p.add_argument("--steps", default="correctness,moe,timing,tuner", help="comma-separated steps to run")
    p.add_argument("--tune-iters", type=int, default=200, help="tuner iterations (default recipe: 200)")
    p.add_argument("--replays", type=int, default=20, help="timed CUDA-graph replays per case (median)")
    return p.parse_args(argv)


def one_line(e: BaseException, limit: int = 240) -> str:
    """An exception as one table-safe line: its type and the last line of its message."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:limit].replace("|", "/")


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def failure_lines(what: str, e: BaseException) -> list[str]:
    """A failed step's traceback for the report (called in its `except` block)."""
    import traceback

    log(f"{what} failed: {type(e).__name__}: {e}")
    return ["Failed:", "", "```", traceback.format_exc()[-3000:], "```"]


# ----------------------------------------------------------------------------
# The bundle: made here, unpacked there
# ----------------------------------------------------------------------------
def prepare_bundle(folder: Path, python_version: str) -> None:
    """Wheels for the GPU machine's Python, SmolLM2's tokenizer and the Wikipedia calibration text."""
    wheels = folder / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    target = ["--only-binary=:all:", "--python-version", python_version, "--platform", "manylinux2014_x86_64",
              "--platform", "manylinux_2_17_x86_64", "--implementation", "cp", "-d", str(wheels)]
    subprocess.run([*pip, "download", "-q", "--no-deps", *target, *BUNDLE_WHEELS], check=True)
    subprocess.run([*pip, "download", "-q", *target, "pydantic"], check=True)  # pydantic-core pinned by pydantic
    with tempfile.TemporaryDirectory() as tmp:  # gemlite is an sdist: build its (pure Python) wheel here
        subprocess.run([*pip, "download", "-q", "--no-deps", "--no-binary=:all:", "-d", tmp, "gemlite"], check=True)
        sdist = next(Path(tmp).glob("gemlite-*"))
        subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(wheels), str(sdist)], check=True)
    from transformers import AutoTokenizer

    from offline_tuner.default_model import prepare_default_model
    from offline_tuner.text_data import wikipedia_text

    AutoTokenizer.from_pretrained(prepare_default_model()).save_pretrained(folder / "tokenizer")
    (folder / "calibration.txt").write_text(wikipedia_text("calibration"))
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    log(f"bundle in {folder}: {size / 2 ** 20:.1f} MiB ({', '.join(sorted(w.name for w in wheels.iterdir()))})")


def unpack_wheels(bundle: Path, site: Path) -> list[str]:
    """Unzip the bundle's wheels into `site` (a wheel is a zip of its installed files) and import from it."""
    names = []
    for wheel in sorted((bundle / "wheels").glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
        names.append(wheel.name.split("-")[0])
    sys.path.insert(0, str(site))
    return names


# ----------------------------------------------------------------------------
# Step 1: correctness
# ----------------------------------------------------------------------------
def correctness_cases(tiny: bool) -> list[tuple]:
    """(bits, group_size, sym, dtype name, M, K, N, autotuned)."""
    settings = [(32, True, "float16"), (64, False, "bfloat16"), (128, False, "bfloat16"), (128, True, "float16"),
                (-1, True, "bfloat16"), (-1, False, "float16")]
    if tiny:
        return [(b, g, s, d, m, 128, 40, False) for b in BITS for (g, s, d) in settings[:3] for m in (1, 3)]
    # Awkward sizes with one forced configuration each (every new combination costs a compilation),
    # then the real shapes autotuned as the timing step runs them.
    awkward = [(3, 1024, 1000), (33, 2048, 4100)]
    real = [(1, 4096, 14336), (16, 4096, 4096), (256, 14336, 4096)]
    cases = [(b, g, s, d, m, k, n, False) for b in BITS for (g, s, d) in settings for (m, k, n) in awkward]
    cases += [(b, 128, False, "bfloat16", m, k, n, True) for b in BITS for (m, k, n) in real]
    return cases


def check_correctness(device: str, tiny: bool) -> tuple[list[str], list[str]]:
    """Markdown lines and failures: the operator and the checked entry point against the reference."""
    import torch

    import signround_triton.ops  # noqa: F401  registers torch.ops.signround.dequant_gemm
    from benchmarks.kernel_bench import random_layer
    from signround_triton.dequant_gemm import default_config, dequant_gemm, kernel_group_size, tuned_config
    from signround_triton.reference import reference_linear

    lines = ["| layer | dtype | M x K x N | max err / max ref (operator) | checked entry | config |",
             "|---|---|---|---:|---:|---|"]
    failures = []
    for i, (bits, group, sym, dtype_name, m, k, n, autotuned) in enumerate(correctness_cases(tiny)):
        dtype = getattr(torch, dtype_name)
        packed = random_layer(bits, group, sym, n, k, device, seed=1000 + i)
        gen = torch.Generator(device=device).manual_seed(2000 + i)
        x = torch.randn(m, k, generator=gen, device=device).to(dtype)
        bias = torch.randn(n, generator=gen, device=device).to(dtype) if (group == 64 and not autotuned) else None
        config = None if autotuned or device == "cpu" else default_config(m, k)
        label = f"W{bits}G{group}{'sym' if sym else 'asym'}"
        errors = {}
        try:
            ref = reference_linear(x, packed, bias)
            outputs = {"checked entry": dequant_gemm(x, packed.qweight, packed.scales, packed.qzeros, bits, group,
                                                     bias, config=config)}
            if config is None:  # the operator takes no forced configuration: autotuned (or interpreted) only
                outputs["operator"] = torch.ops.signround.dequant_gemm(x, packed.qweight, packed.scales,
                                                                       packed.qzeros, bias, bits,
                                                                       kernel_group_size(group, k))
            for what, y in outputs.items():
                finite = bool(torch.isfinite(y).all())
                errors[what] = ((y.float() - ref).abs().max() / ref.abs().max()).item() if finite else float("nan")
        except Exception as e:  # noqa: BLE001 - a failing case is reported, the check goes on
            failures.append(f"{label} {dtype_name} {m}x{k}x{n}: {one_line(e)}")
            lines.append(f"| {label} | {dtype_name} | {m}x{k}x{n} | {type(e).__name__} | | |")
            continue
        tol = 1e-2 if dtype == torch.float16 else 2e-2
        for what, err in errors.items():
            if not err <= tol:  # NaN fails too
                failures.append(f"{label} {dtype_name} {m}x{k}x{n} ({what}): error {err:.2e} (NaN: non-finite "
                                f"output) > {tol:.0e}")
        chosen = str(config) if config is not None else (tuned_config(m) or "interpreter default")
        op = f"{errors['operator']:.2e}" if "operator" in errors else "(forced config: entry only)"
        lines.append(f"| {label} | {dtype_name} | {m}x{k}x{n} | {op} | {errors['checked entry']:.2e} | {chosen} |")
    lines.append("")
    lines.append(f"{len(lines) - 3} cases, {len(failures)} failed" + (":" if failures else "."))
    lines += [f"- {f}" for f in failures]
    return lines, failures


# ----------------------------------------------------------------------------
# Step 2: timing
# ----------------------------------------------------------------------------
def time_fns(fns, device: str, replays: int, notes: dict | None = None, key: str = "") -> float:
    """Median microseconds per call over closures that rotate through copies (CUDA graphs on a GPU); `notes`
    gets key's reason when the CUDA graph could not be captured (eager launches timed instead)."""
    if device == "cuda":
        from benchmarks.kernel_bench import time_calls

        result = time_calls(fns, replays)
        if notes is not None and "graph_error" in result:
            notes[f"{key}: eager launches timed"] = result["graph_error"]
        return result["us"]
    for f in fns:
        f()
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        for f in fns:
            f()
        samples.append((time.perf_counter() - t0) * 1e6 / len(fns))
    return statistics.median(samples)


def make_gemlite(packed, dtype):
    """gemlite's layer holding the same integers, or raises (gemlite absent, or a setting it lacks)."""
    import gemlite
    import torch

    from signround_vllm.format import unpack_int_weights

    spec = packed.spec
    q = unpack_int_weights(packed.qweight, spec.bits).t().contiguous()  # uint8 [N, K]
    scales = packed.scales.t().to(dtype).contiguous()  # [N, K / G]
    zeros = packed.qzeros.t().to(dtype).contiguous()  # [N, K / G]
    gem_dtype = gemlite.DType.BF16 if dtype == torch.bfloat16 else gemlite.DType.FP16
    layer = gemlite.GemLiteLinearTriton(W_nbits=spec.bits, group_size=spec.group_size, in_features=q.shape[1],
                                        out_features=q.shape[0], input_dtype=gem_dtype, output_dtype=gem_dtype)
    layer.pack(q, scales, zeros, bias=None)
    return layer


def bench_timing(device: str, tiny: bool, replays: int, deadline: float, flush) -> list[str]:
    import torch

    from benchmarks.kernel_bench import layer_bytes, make_torch_int4, random_layer
    from signround_triton.dequant_gemm import launch

    dtype = torch.bfloat16
    group = 32 if tiny else 128
    shapes = [("tiny", 128, 96), ("tiny", 256, 64)] if tiny else list(SHAPES)
    batches = (1, 16) if tiny else BATCHES
    l2 = torch.cuda.get_device_properties(0).L2_cache_size if device == "cuda" else 1 << 20
    copy_bw = None
    if device == "cuda":
        from benchmarks.kernel_bench import copy_bandwidth

        copy_bw = copy_bandwidth()
    head = [f"Weights group {group}, asym, bf16 activations; times in microseconds per call (median of "
            f"{replays} CUDA-graph replays), each call reading weights not in the L2 ({l2 / 2 ** 20:.0f} MB). "
            f"GB/s counts weights, scales, zeros and activations read. "
            + (f"Device copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write)." if copy_bw else
               "CPU under the Triton interpreter: the times only show that the pipeline runs."),
            "",
            "| model | K x N | M | W2 | W3 | W4 | W8 | bf16 | tinygemm W4 | gemlite W2 | gemlite W4 | gemlite W8 | "
            "W4 GB/s | W4 % copy | W4 vs bf16 | W4 vs gemlite W4 |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows: list[str] = []
    notes: dict[str, str] = {}

    def copies(nbytes: int) -> int:
        return max(2, -(-2 * l2 // max(nbytes, 1))) if device == "cuda" else 1

    for model, k, n in shapes:
        if time.time() > deadline:
            notes["deadline"] = f"stopped before {model} {k}x{n}: the --minutes budget was spent"
            break
        gen_seed = k * 7 + n
        layers = {b: [random_layer(b, group, False, n, k, device, gen_seed + 97 * b + i)
                      for i in range(copies(k * n * b // 8))] for b in BITS}
        dense = [torch.randn(n, k, device=device, dtype=dtype) for _ in range(copies(2 * k * n))]
        int4 = []
        fn, nbytes, why = make_torch_int4(n, k, group, device, gen_seed)
        if fn is not None:
            int4 = [fn] + [make_torch_int4(n, k, group, device, gen_seed + i)[0] for i in range(1, copies(nbytes))]
        else:
            notes["tinygemm"] = why
        gem = {}
        for b in GEMLITE_BITS:
            try:
                gem[b] = [make_gemlite(p, dtype) for p in layers[b]]
            except Exception as e:  # noqa: BLE001 - reported as a note
                notes[f"gemlite W{b}"] = one_line(e)
        for m in batches:
            if time.time() > deadline:
                notes["deadline"] = f"stopped at {model} {k}x{n} M={m}: the --minutes budget was spent"
                break
            xs = [torch.randn(m, k, device=device, dtype=dtype) for _ in range(4)]
            t = {}
            for b, copies_b in layers.items():
                t[f"W{b}"] = time_fns([lambda p=p, x=xs[i % 4], b=b: launch(x, p.qweight, p.scales, p.qzeros, b, group)
                                       for i, p in enumerate(copies_b)], device, replays)
            t["bf16"] = time_fns([lambda w=w, x=xs[i % 4]: torch.nn.functional.linear(x, w)
                                  for i, w in enumerate(dense)], device, replays)
            if int4:
                t["tinygemm"] = time_fns([lambda f=f, x=xs[i % 4]: f(x) for i, f in enumerate(int4)], device, replays)
            for b, mods in gem.items():
                try:
                    t[f"gemlite W{b}"] = time_fns([lambda g=g, x=xs[i % 4]: g(x) for i, g in enumerate(mods)],
                                                  device, replays)
                except Exception as e:  # noqa: BLE001
                    notes[f"gemlite W{b} M={m}"] = one_line(e)
            gbs = layer_bytes(layers[4][0], m) / (t["W4"] * 1e-6) / 1e9

            def cell(key):
                return f"{t[key]:.1f}" if key in t else ""

            rows.append(f"| {model} | {k}x{n} | {m} | {cell('W2')} | {cell('W3')} | {cell('W4')} | {cell('W8')} | "
                        f"{cell('bf16')} | {cell('tinygemm')} | {cell('gemlite W2')} | {cell('gemlite W4')} | "
                        f"{cell('gemlite W8')} | {gbs:.0f} | "
                        f"{'' if copy_bw is None else f'{100 * gbs * 1e9 / copy_bw:.0f}%'} | "
                        f"{t['bf16'] / t['W4']:.2f}x | "
                        f"{'' if 'gemlite W4' not in t else '%.2fx' % (t['gemlite W4'] / t['W4'])} |")
            log(rows[-1])
            flush(head + rows + [""] + [f"- {k_}: {v}" for k_, v in notes.items()])
        del layers, dense, int4, gem
        if device == "cuda":
            torch.cuda.empty_cache()
    return head + rows + [""] + [f"- {k_}: {v}" for k_, v in notes.items()]


# ----------------------------------------------------------------------------
# Step 3: the tuner on CUDA, ours against auto-round
# ----------------------------------------------------------------------------
def write_one_block_model(folder: Path, shape: dict, tokenizer_dir: Path) -> Path:
    """A one-block Llama with the given shapes, random bf16 weights, and a real tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                         intermediate_size=shape["intermediate"], num_hidden_layers=1,
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                         tie_word_embeddings=False, max_position_embeddings=8192, rope_theta=500000.0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_ours(model_dir: Path, out: Path, device: str, iters: int, n_samples: int, seq_len: int, text: Path) -> dict:
    import torch

    from offline_tuner.quantize import Calibration, quantize_checkpoint
    from offline_tuner.signround import TuneSettings
    from signround_vllm.format import LayerQuantSpec, SignRoundConfig

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = quantize_checkpoint(model_dir, out, SignRoundConfig(default=LayerQuantSpec(4, 128, False)),
                                 tune=TuneSettings(iters=iters, batch_size=8),
                                 calibration=Calibration(n_samples, seq_len, text_file=str(text)),
                                 overwrite=True, device=device)
    seconds = time.perf_counter() - t0
    block = result.run_log["blocks"][0]
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"seconds": seconds, "block_seconds": block["seconds"], "peak_gpu_bytes": peak,
            "rtn_loss": block["rtn_loss"], "tuned_loss": block["tuned_loss"]}


def run_autoround(model_dir: Path, windows: Path, device: str, iters: int, site: Path | None, work: Path) -> dict:
    """auto-round 0.16.1 in its own process on the same model and windows; its time and peak GPU memory."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in (site, REPO) if p))
    cmd = [sys.executable, str(REPO / "benchmarks" / "autoround_scale_driver.py"), str(model_dir),
           "--calibration", str(windows), "--iters", str(iters), "--batch-size", "8", "--device", device,
           "--stub-datasets"]
    log_path = work / "autoround.log"
    with open(log_path, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=1800)
    text = log_path.read_text(errors="replace")
    result = re.search(r"AUTOROUND_RESULT=(\{.*\})", text)
    if proc.returncode != 0 or not result:
        raise RuntimeError(f"auto-round failed (exit {proc.returncode}, log {log_path.name}): {text[-600:]}")
    return json.loads(result.group(1))


def bench_tuner(device: str, tiny: bool, iters: int, bundle: Path | None, site: Path | None) -> list[str]:
    import torch

    from offline_tuner.quantize import Calibration, calibration_windows

    shape = TINY_MODEL if tiny else LLAMA_8B
    n_samples, seq_len = (8, 64) if tiny else (128, 2048)
    with tempfile.TemporaryDirectory(prefix="gpu-check-tuner-") as tmp:
        work = Path(tmp)
        if bundle is not None:
            tokenizer_dir, text = bundle / "tokenizer", bundle / "calibration.txt"
        else:  # here: the embedded default model's tokenizer and the built-in Wikipedia text
            from offline_tuner.default_model import prepare_default_model
            from offline_tuner.text_data import wikipedia_text

            tokenizer_dir, text = prepare_default_model(), work / "calibration.txt"
            text.write_text(wikipedia_text("calibration"))
        t0 = time.perf_counter()
        model_dir = write_one_block_model(work / "model", shape, tokenizer_dir)
        log(f"one-block model written in {time.perf_counter() - t0:.0f} s")
        ours = run_ours(model_dir, work / "ours", device, iters, n_samples, seq_len, text)
        log(f"ours: {ours}")
        windows = work / "windows.pt"
        torch.save(calibration_windows(model_dir, Calibration(n_samples, seq_len, text_file=str(text)), seed=0),
                   windows)
        try:
            theirs = run_autoround(model_dir, windows, device, iters, site, work)
            log(f"auto-round: {theirs}")
        except Exception as e:  # noqa: BLE001 - reported in the table
            theirs = {"error": one_line(e, 400)}

    def gib(v):
        return "" if v is None else f"{v / 2 ** 30:.2f}"

    lines = [f"One block with the {'tiny' if tiny else 'Llama-3.1-8B'} shapes (hidden {shape['hidden']}, "
             f"intermediate {shape['intermediate']}), random bf16 weights, W4G128 asym, {iters} iterations, "
             f"{n_samples} x {seq_len} tokens of Wikipedia text (the same windows for both tools), batch 8, "
             f"tuned on {device}.",
             "",
             "| tool | whole run s | block s | peak GPU memory GiB | note |", "|---|---:|---:|---:|---|",
             f"| signround | {ours['seconds']:.1f} | {ours['block_seconds']:.1f} | {gib(ours['peak_gpu_bytes'])} | "
             f"block loss {ours['rtn_loss']:.3g} (RTN) -> {ours['tuned_loss']:.3g} |"]
    if "error" in theirs:
        lines.append(f"| auto-round 0.16.1 | | | | not run: {theirs['error']} |")
    else:
        lines.append(f"| auto-round 0.16.1 | {theirs['seconds']:.1f} | | {gib(theirs.get('peak_gpu_bytes'))} | "
                     f"its whole quantize() call, one block |")
        lines += ["", f"Whole run, ours / auto-round: {ours['seconds'] / theirs['seconds']:.2f}."]
    return lines


# ----------------------------------------------------------------------------
# Step 4: mixture of experts (the fused-MoE kernel), its correctness and its timing
# ----------------------------------------------------------------------------
def random_experts(bits, group, sym, n_experts, hidden, inter, device, seed):
    """Per expert, random packed layers: gate and up [2I, hidden] (gate first), down [hidden, I]."""
    from benchmarks.kernel_bench import random_layer

    return ([random_layer(bits, group, sym, 2 * inter, hidden, device, seed + 2 * e) for e in range(n_experts)],
            [random_layer(bits, group, sym, hidden, inter, device, seed + 2 * e + 1) for e in range(n_experts)])


def moe_correctness_cases(tiny: bool) -> list[tuple]:
    """(shape, experts, hidden, I, group, bits, sym, dtype name, autotuned, [(M, top-k)]): a table row each."""
    settings = [(s, d) for s in (False, True) for d in ("bfloat16", "float16")]
    if tiny:  # one row a bit width, the symmetries, dtypes and (M, top-k) dealt round them
        return [("tiny-moe", 9, 96, 32, 32, b, *settings[i], False, [((1, 2), (3, 8))[i % 2]])
                for i, b in enumerate(BITS)]
    pairs = [(m, k) for m in MOE_TOKENS for k in MOE_TOP_K]
    # The awkward layer (tails in K and N, 10 experts) with each bucket's first configuration forced (every new
    # combination costs a compilation), then Qwen3-30B-A3B's autotuned as the timing step runs it.
    qwen = ("Qwen3-30B-A3B", 128, 2048, 768, 128)
    return ([("awkward", 10, 320, 96, 32, b, s, d, False, pairs) for b in BITS for s, d in settings]
            + [(*qwen, b, False, "bfloat16", True, pairs) for b in BITS]
            + [(*qwen, b, True, "float16", False, [(7, 8), (512, 8)]) for b in BITS])


def check_moe_correctness(device: str, tiny: bool, flush) -> tuple[list[str], list[str]]:
    """Markdown lines and failures: the operator and the checked entry point against reference_experts."""
    import torch

    import signround_triton.ops  # noqa: F401  registers torch.ops.signround.fused_experts
    from signround_triton.fused_moe import PackedExperts, fused_experts, moe_bucket_for
    from signround_triton.reference import reference_experts

    cases = moe_correctness_cases(tiny)
    pairs = list(dict.fromkeys(p for case in cases for p in case[-1]))
    lines = ["Max |y - ref| / max |ref| (the larger of the operator's and the checked entry's where both ran) per "
             f"M x top-k; limits {MOE_TOLERANCE['float16']:.0e} (fp16) and {MOE_TOLERANCE['bfloat16']:.0e} (bf16), "
             "those of tests/test_triton_moe.py. Random routing, distinct experts per token, fp32 routing weights, "
             "int32 ids (as vLLM passes them); for M >= 3, two ids out of range (another rank's experts: they add "
             "nothing).",
             "",
             "| shape | layer | dtype | path | " + " | ".join(f"{m}x{k}" for m, k in pairs) + " |",
             "|---|---|---|---|" + "---:|" * len(pairs)]
    failures, worst, built = [], {}, None
    for i, (shape, n_exp, hidden, inter, group, bits, sym, dtype_name, autotuned, row_pairs) in enumerate(cases):
        dtype = getattr(torch, dtype_name)
        if built != (shape, bits, sym):  # a new layer (the previous one freed first)
            w13 = w2 = p13 = p2 = None
            w13, w2 = random_experts(bits, group, sym, n_exp, hidden, inter, device, seed=3000 + 1000 * i)
            p13, p2, built = PackedExperts.stack(w13), PackedExperts.stack(w2), (shape, bits, sym)
        label = f"W{bits}G{group}{'sym' if sym else 'asym'}"
        forced = not autotuned and device != "cpu"  # the operator takes no configuration: entry only
        cells = {}
        for m, top_k in row_pairs:
            gen = torch.Generator(device=device).manual_seed(5000 + 100 * i + m + top_k)
            x = torch.randn(m, hidden, generator=gen, device=device).to(dtype)
            ids = torch.rand(m, n_exp, generator=gen, device=device).argsort(dim=1)[:, :top_k].to(torch.int32)
            if m >= 3:
                ids[1, 0], ids[2, top_k - 1] = -1, n_exp
            weights = torch.rand(m, top_k, generator=gen, device=device) * 0.8 + 0.2
            case = f"{shape} {label} {dtype_name} M={m} top-{top_k}"
            errors = {}
            try:
                ref = reference_experts(x, w13, w2, weights, ids)
                config = moe_bucket_for(m * top_k, n_exp)[1][0] if forced else None
                outputs = {"checked entry": fused_experts(x, p13, p2, weights, ids, config=config)}
                if not forced:
                    outputs["operator"] = torch.ops.signround.fused_experts(
                        x, p13.qweight, p13.scales, p13.qzeros, bits, group, p2.qweight, p2.scales, p2.qzeros, bits,
                        group, weights, ids)
                for what, y in outputs.items():
                    finite = bool(torch.isfinite(y).all())  # NaN / inf first: the error would hide them
                    errors[what] = ((y.float() - ref).abs().max() / ref.abs().max()).item() if finite else float("nan")
            except Exception as e:  # noqa: BLE001 - a failing case is reported, the check goes on
                failures.append(f"{case}: {one_line(e)}")
                cells[(m, top_k)] = type(e).__name__
                continue
            for what, err in errors.items():
                if not err <= MOE_TOLERANCE[dtype_name]:  # NaN fails too
                    failures.append(f"{case} ({what}): error {err:.2e} (NaN: non-finite output) > "
                                    f"{MOE_TOLERANCE[dtype_name]:.0e}")
            err = max(errors.values(), key=lambda v: (v != v, v))  # NaN counts as the largest
            cells[(m, top_k)] = f"{err:.1e}"
            if err == err:
                worst[dtype_name] = max(worst.get(dtype_name, 0.0), err)
        path = ("checked entry, each bucket's first config" if forced else
                "operator + checked entry" + (", autotuned" if autotuned else ""))
        lines.append(f"| {shape} E{n_exp} {hidden}x{inter} | {label} | {dtype_name} | {path} | "
                     + " | ".join(cells.get(p, "") for p in pairs) + " |")
        log(lines[-1])
        flush(lines)
    lines.append("")
    lines.append(f"{sum(len(c[-1]) for c in cases)} MoE cases, {len(failures)} failed; largest error "
                 + ", ".join(f"{d} {e:.1e}" for d, e in worst.items()) + (":" if failures else "."))
    lines += [f"- {f}" for f in failures]
    return lines, failures


def bf16_experts(w13, w2, topk_weights, topk_ids, grouped: bool):
    """The bf16 baseline for one routing on dense weights w13 [E, 2I, hidden] and w2 [E, hidden, I]: a closure
    x [M, hidden] -> out [M, hidden]. grouped: torch._grouped_mm over the assignments sorted by expert in the call
    (as ours sorts); otherwise a loop of matmuls over the experts in use, their rows found before the call."""
    import torch
    import torch.nn.functional as F

    m, top_k = topk_ids.shape
    n_exp, hidden, inter = w2.shape
    flat, flat_weights = topk_ids.reshape(-1).long(), topk_weights.reshape(-1).float()

    if grouped:
        def run(x):
            order = torch.argsort(flat, stable=True)
            counts = torch.zeros(n_exp, dtype=torch.int32, device=x.device).scatter_add_(
                0, flat, torch.ones_like(flat, dtype=torch.int32))
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            rows = order // top_k
            h = torch._grouped_mm(x[rows], w13.transpose(1, 2), offs=offs)
            y = torch._grouped_mm(F.silu(h[:, :inter]) * h[:, inter:], w2.transpose(1, 2), offs=offs)
            out = torch.zeros(m, hidden, dtype=torch.float32, device=x.device)
            return out.index_add_(0, rows, y.float() * flat_weights[order, None]).to(x.dtype)
        return run
    experts = [(e, torch.nonzero(flat == e).flatten()) for e in flat.unique().tolist()]

    def run(x):
        out = torch.zeros(m, hidden, dtype=torch.float32, device=x.device)
        for e, assignments in experts:
            rows = assignments // top_k
            h = x[rows] @ w13[e].t()
            y = (F.silu(h[:, :inter]) * h[:, inter:]) @ w2[e].t()
            out.index_add_(0, rows, y.float() * flat_weights[assignments, None])
        return out.to(x.dtype)
    return run


def bench_moe_timing(device: str, tiny: bool, replays: int, deadline: float, flush) -> list[str]:
    import torch

    from benchmarks.kernel_bench import packed_bytes
    from signround_triton import fused_moe
    from signround_triton.fused_moe import PackedExperts, launch_fused_experts

    dtype = torch.bfloat16
    group = 32 if tiny else 128
    models = [("tiny-moe", 8, 64, 32, 2)] if tiny else list(MOE_MODELS)
    batches = (1, 2) if tiny else MOE_BATCHES
    l2 = torch.cuda.get_device_properties(0).L2_cache_size if device == "cuda" else 1 << 20
    copy_bw = None
    if device == "cuda":
        from benchmarks.kernel_bench import copy_bandwidth

        copy_bw = copy_bandwidth()
    grouped = hasattr(torch, "_grouped_mm")
    baseline = "torch._grouped_mm" if grouped else "a loop of torch matmuls over the experts in use"
    head = [f"Expert layers (gate and up fused, then down) at W2/W3/W4/W8 group {group}, asym, bf16 activations, "
            f"fp32 routing weights; microseconds per call of the whole layer from (x, topk_weights, topk_ids), the "
            f"sorting by expert included: `launch_fused_experts`, autotuned, what the operator runs; median of "
            f"{replays} CUDA-graph replays. bf16: the same layer on dense bf16 weights of the same shapes and the same "
            f"routing: the assignments sorted by expert (in the call, as ours), {baseline} for both projections, "
            f"silu(gate) * up between, the weighted sum over top-k after (checked against a plain per-expert loop "
            f"of matmuls at each M). Routing of call c: token t's j-th expert is (c * M * top_k + t * top_k + j) mod "
            f"E: the experts' loads balanced, min(M * top_k, E) experts touched (the most a batch of M can touch), "
            f"the next call's experts the next ones; a cycle of calls touches more than twice the L2 "
            f"({l2 / 2 ** 20:.0f} MB) and each layer is larger than that, so every call reads its experts from "
            f"memory. GB/s: bytes of the experts touched (weights, scales, zeros; not activations) per second. "
            + (f"Device copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write)." if copy_bw else
               "CPU under the Triton interpreter: the times only show that the pipeline runs."),
            "",
            "| model | E x hidden x I, top-k | M | weights | experts touched | us | bf16 / this (> 1: faster) | GB/s | "
            "% copy |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    rows: list[str] = []
    notes: dict[str, str] = {}
    for model, n_exp, hidden, inter, top_k in models:
        if time.time() > deadline:
            notes["deadline"] = f"stopped before {model}: the --minutes budget was spent"
            break
        experts, expert_bytes = {}, {"bf16": 3 * hidden * inter * 2}
        for b in (4, 2, 3, 8):
            w13, w2 = random_experts(b, group, False, n_exp, hidden, inter, device, seed=7000 + 1000 * b)
            experts[f"W{b}"] = (PackedExperts.stack(w13), PackedExperts.stack(w2))
            expert_bytes[f"W{b}"] = packed_bytes(hidden, 2 * inter, b, group, False) + \
                packed_bytes(inter, hidden, b, group, False)
            del w13, w2
        dense13 = torch.randn(n_exp, 2 * inter, hidden, device=device, dtype=dtype) / hidden ** 0.5
        dense2 = torch.randn(n_exp, hidden, inter, device=device, dtype=dtype) / inter ** 0.5
        if device == "cuda" and n_exp * min(expert_bytes.values()) < 2 * l2:
            notes[f"{model} L2"] = "a layer smaller than twice the L2: calls may read from the L2"
        for m in batches:
            if time.time() > deadline:
                notes["deadline"] = f"stopped at {model} M={m}: the --minutes budget was spent"
                break
            touched = min(m * top_k, n_exp)

            def calls(key):  # per cycle: more than twice the L2 of distinct experts
                return max(2, -(-2 * l2 // (touched * expert_bytes[key]))) if device == "cuda" else 1

            routes = []
            for c in range(max(calls(k) for k in expert_bytes)):
                ids = (c * m * top_k + torch.arange(m * top_k, device=device)) % n_exp
                routes.append((torch.rand(m, top_k, device=device), ids.view(m, top_k).to(torch.int32)))
            xs = [torch.randn(m, hidden, device=device, dtype=dtype) for _ in range(4)]
            t = {}
            for key, (w13, w2) in experts.items():
                t[key] = time_fns([lambda x=xs[c % 4], r=routes[c], w13=w13, w2=w2: launch_fused_experts(x, w13, w2, *r)
                                   for c in range(calls(key))], device, replays, notes, f"{model} M={m} {key}")
            if grouped:  # the grouped baseline against the plain loop, on this M's first routing
                try:
                    y, ref = (bf16_experts(dense13, dense2, *routes[0], g)(xs[0]).float() for g in (True, False))
                    if not (y - ref).abs().max() <= 2e-2 * ref.abs().max():
                        raise ValueError(f"differs from the loop by {((y - ref).abs().max() / ref.abs().max()):.1e}")
                except Exception as e:  # noqa: BLE001 - the loop is timed instead
                    grouped = False
                    notes["bf16"] = f"torch._grouped_mm not used from {model} M={m} on: {one_line(e)}"
            bf16_fns = [bf16_experts(dense13, dense2, *routes[c], grouped) for c in range(calls("bf16"))]
            t["bf16"] = time_fns([lambda x=xs[c % 4], f=f: f(x) for c, f in enumerate(bf16_fns)], device, replays,
                                 notes, f"{model} M={m} bf16")
            for key in t:
                gbs = touched * expert_bytes[key] / (t[key] * 1e-6) / 1e9
                share = "" if copy_bw is None else f"{100 * gbs * 1e9 / copy_bw:.0f}%"
                rows.append(f"| {model} | {n_exp}x{hidden}x{inter}, top-{top_k} | {m} | "
                            f"{key if key != 'bf16' else 'bf16 (' + ('grouped' if grouped else 'loop') + ')'} | "
                            f"{touched} | {t[key]:.1f} | {t['bf16'] / t[key]:.2f}x | {gbs:.0f} | {share} |")
                log(rows[-1])
            flush(head + rows + [""] + [f"- {k_}: {v}" for k_, v in notes.items()])
        del experts, dense13, dense2
        if device == "cuda":
            torch.cuda.empty_cache()
    for bucket, tuner in fused_moe._AUTOTUNERS.items():  # what the autotuner chose, for the configuration table
        chosen = Counter(str(c) for c in getattr(tuner, "cache", {}).values())
        notes[f"autotuned, bucket '{bucket}'"] = "; ".join(f"{c} ({n} keys)" for c, n in chosen.most_common())
    return head + rows + [""] + [f"- {k_}: {v}" for k_, v in notes.items()]


# ----------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.prepare_bundle:
        prepare_bundle(args.prepare_bundle, args.bundle_python)
        return 0
    if args.tiny:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    from benchmarks.benchlib import use_checkout_packages

    use_checkout_packages()
    import torch
    import triton

    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); --tiny runs the pipeline on CPU",
              file=sys.stderr)
        return 2
    site = None
    wheels = []
    if args.bundle:
        site = Path(tempfile.mkdtemp(prefix="gpu-check-site-"))
        wheels = unpack_wheels(args.bundle, site)
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        where = (f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2 ** 30:.0f} GiB, "
                 f"L2 {p.L2_cache_size / 2 ** 20:.0f} MB)")
    else:
        from benchmarks.benchlib import machine

        where = f"CPU, Triton interpreter ({machine()})"
    head = ["# GPU check", "",
            f"- device: {where}; torch {torch.__version__}, triton {triton.__version__}, "
            f"Python {sys.version.split()[0]}",
            f"- command: `{shlex.join(['python', *sys.argv])}`",
            f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
            f"- bundle wheels: {', '.join(wheels) or 'none'}"]
    sections: dict[str, list[str]] = {}

    def flush(key=None, lines=None):
        if key is not None:
            sections[key] = lines
        text = "\n".join(head) + "\n" + "".join(f"\n## {k}\n\n" + "\n".join(v) + "\n"
                                               for k, v in sorted(sections.items()))  # by number, not by time
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
        return text

    t0 = time.time()
    deadline = t0 + 60 * args.minutes
    steps = {s.strip() for s in args.steps.split(",")}
    failed = False
    moe_parts: dict[str, list[str]] = {}  # step 4's report: its correctness (run early), then its timing

    def moe_flush(part, lines):
        moe_parts[part] = list(lines)
        flush("4. Mixture of experts (the fused-MoE kernel)",
              [line for p, v in moe_parts.items() for line in (f"### {p}", "", *v, "")])

    if "correctness" in steps:
        lines, failures = check_correctness(device, args.tiny)
        failed |= bool(failures)
        flush("1. Correctness against the pure-torch reference", lines)
        log(f"correctness: {len(failures)} failures ({time.time() - t0:.0f} s)")
    if "moe" in steps:
        part = "Correctness against reference_experts"
        try:
            lines, failures = check_moe_correctness(device, args.tiny, lambda lines: moe_flush(part, lines))
            failed |= bool(failures)
            log(f"MoE correctness: {len(failures)} failures ({time.time() - t0:.0f} s)")
        except Exception as e:  # noqa: BLE001 - the report says what failed
            failed, lines = True, moe_parts.get(part, []) + failure_lines("MoE correctness", e)
        moe_flush(part, lines)
    if "tuner" in steps:
        try:
            lines = bench_tuner(device, args.tiny, 2 if args.tiny else args.tune_iters, args.bundle, site)
        except Exception as e:  # noqa: BLE001 - the report says what failed
            failed, lines = True, failure_lines("tuner", e)
        flush("2. The tuner on " + device, lines)
    if "timing" in steps:
        key = "3. Timing (until the --minutes budget is spent)"
        share = args.moe_share if "moe" in steps else 0.0  # kept for step 4's timing
        bench_timing(device, args.tiny, args.replays, deadline - share * max(0.0, deadline - time.time()),
                     lambda lines: flush(key, lines))
        log(f"timing done ({time.time() - t0:.0f} s)")
    if "moe" in steps:
        part = "Timing (until the --minutes budget is spent)"
        try:
            moe_flush(part, bench_moe_timing(device, args.tiny, args.replays, deadline,
                                             lambda lines: moe_flush(part, lines)))
        except Exception as e:  # noqa: BLE001 - the report says what failed
            failed = True
            moe_flush(part, moe_parts.get(part, []) + failure_lines("MoE timing", e))
        log(f"MoE timing done ({time.time() - t0:.0f} s)")
    head.append(f"- total time: {time.time() - t0:.0f} s")
    print(flush())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
