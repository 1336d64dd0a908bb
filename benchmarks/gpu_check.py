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
   device copy bandwidth; the most wanted shapes first, until --minutes after the start.

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
    p.add_argument("--steps", default="correctness,timing,tuner", help="comma-separated steps to run")
    p.add_argument("--tune-iters", type=int, default=200, help="tuner iterations (default recipe: 200)")
    p.add_argument("--replays", type=int, default=20, help="timed CUDA-graph replays per case (median)")
    return p.parse_args(argv)


def one_line(e: BaseException, limit: int = 240) -> str:
    """An exception as one table-safe line: its type and the last line of its message."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:limit].replace("|", "/")


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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
def time_fns(fns, device: str, replays: int) -> float:
    """Median microseconds per call over closures that rotate through copies (CUDA graphs on a GPU)."""
    if device == "cuda":
        from benchmarks.kernel_bench import time_calls

        return time_calls(fns, replays)["us"]
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
        text = "\n".join(head) + "\n" + "".join(f"\n## {k}\n\n" + "\n".join(v) + "\n" for k, v in sections.items())
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
        return text

    t0 = time.time()
    steps = {s.strip() for s in args.steps.split(",")}
    failed = False
    if "correctness" in steps:
        lines, failures = check_correctness(device, args.tiny)
        failed |= bool(failures)
        flush("1. Correctness against the pure-torch reference", lines)
        log(f"correctness: {len(failures)} failures ({time.time() - t0:.0f} s)")
    if "tuner" in steps:
        try:
            lines = bench_tuner(device, args.tiny, 2 if args.tiny else args.tune_iters, args.bundle, site)
        except Exception as e:  # noqa: BLE001 - the report says what failed
            import traceback

            failed = True
            lines = ["Failed:", "", "```", traceback.format_exc()[-3000:], "```"]
            log(f"tuner failed: {type(e).__name__}: {e}")
        flush("2. The tuner on " + device, lines)
    if "timing" in steps:
        key = "3. Timing (until the --minutes budget is spent)"
        bench_timing(device, args.tiny, args.replays, t0 + 60 * args.minutes, lambda lines: flush(key, lines))
        log(f"timing done ({time.time() - t0:.0f} s)")
    head.append(f"- total time: {time.time() - t0:.0f} s")
    print(flush())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
