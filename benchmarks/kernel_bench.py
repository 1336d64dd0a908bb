"""Benchmark the SignRound dequant-GEMM Triton kernel on one CUDA GPU, in one run.

1. Correctness on the GPU against the pure-torch reference (NaN checks first) for every
   bit width, several group sizes, both symmetries and both activation dtypes.
2. Median time per call for layer shapes K x N at several batch sizes and bit widths
   (group 128), against torch's bf16 matmul and torch's int4 kernel
   (``aten._weight_int4pack_mm``) where this torch has it. Weights and activations rotate
   over enough copies to exceed the L2 cache (50 MB on an H100), so every call reads from
   DRAM; calls are captured in a CUDA graph so host overhead is not timed (an ``eager``
   column gives the per-call time with Python launch overhead, for the Triton kernel).
3. Optionally, the two ways of fetching packed words (``--compare-word-fetch``).

Reported bandwidth: bytes = K*N*bits/8 + scales + zeros + activations (outputs excluded),
divided by the time; the share is of a measured device-to-device copy bandwidth
(bytes read + written per second). Prints a markdown table with the device and the
command; ``--out FILE`` also writes it (rewritten after every shape, so a run cut short
keeps what it measured).

    python benchmarks/kernel_bench.py --out bench.md
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.benchlib import use_checkout_packages  # noqa: E402

use_checkout_packages()

L2_BYTES = 50 * 2 ** 20
DEVICE = "cuda"  # every tensor of the run lives here
DEFAULT_SHAPES = "4096x4096,4096x11008,4096x14336,14336x4096"
DEFAULT_BATCHES = "1,2,4,8,16,32,64,128,256"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated KxN (in_features x out_features)")
    p.add_argument("--batches", default=DEFAULT_BATCHES, help="comma-separated batch sizes M")
    p.add_argument("--bits", default="2,3,4,8", help="comma-separated bit widths")
    p.add_argument("--group-size", type=int, default=128, help="group size of the timed layers")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="activation dtype of the timed runs")
    p.add_argument("--replays", type=int, default=30, help="timed graph replays per case (median taken)")
    p.add_argument("--config", default=None,
                   help="force one kernel config for every Triton run, e.g. "
                        "'BLOCK_M=16,BLOCK_N=64,BLOCK_K=128,SPLIT_K=4,num_warps=4,num_stages=4'")
    p.add_argument("--skip-correctness", action="store_true", help="skip step 1")
    p.add_argument("--compare-word-fetch", action="store_true",
                   help="also time packed-word loads against per-(k, n) word gathers for a few configs")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown report to this file")
    return p.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        k, _, n = item.strip().lower().partition("x")
        out.append((int(k), int(n)))
    return out


# ----------------------------------------------------------------------------
# Layers and references
# ----------------------------------------------------------------------------
def random_layer(bits, group_size, sym, n, k, device, seed):
    """A PackedLinear of random contents made on `device`: every int32 word is a valid packing."""
    import torch

    from signround_vllm.format import LayerQuantSpec, PackedLinear

    gen = torch.Generator(device=device).manual_seed(seed)
    spec = LayerQuantSpec(bits, group_size, sym)
    groups = k // spec.effective_group_size(k)
    qweight = torch.randint(-2 ** 31, 2 ** 31, (k * bits // 32, n), generator=gen, dtype=torch.int32,
                            device=device)  # [K * bits / 32, N]
    scales = (torch.rand(groups, n, generator=gen, device=device) + 0.5) * (0.1 / (1 << bits))
    scales = scales * torch.where(torch.rand(groups, n, generator=gen, device=device) < 0.5, -1.0, 1.0)
    zeros = None if sym else torch.randint(0, 1 << bits, (groups, n), generator=gen, device=device,
                                           dtype=torch.uint8)
    return PackedLinear(qweight=qweight, scales=scales.half(), qzeros=zeros, spec=spec)


def packed_bytes(k, n, bits, group_size, sym) -> int:
    groups = k // (k if group_size == -1 else group_size)
    return k * n * bits // 8 + groups * n * (2 if sym else 3)


def layer_bytes(packed, m, act_bytes=2) -> int:
    n, k = packed.out_features, packed.in_features
    total = packed.qweight.numel() * 4 + packed.scales.numel() * 2 + m * k * act_bytes
    if packed.qzeros is not None:
        total += packed.qzeros.numel()
    return total


def run_triton(x, packed, config=None):
    from signround_triton.dequant_gemm import dequant_gemm

    return dequant_gemm(x, packed.qweight, packed.scales, packed.qzeros, packed.spec.bits,
                        packed.spec.group_size, config=config)


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------
def copies_for(bytes_per_copy: int) -> int:
    """Enough copies that one cycle over them is at least twice the L2."""
    return max(2, math.ceil(2 * L2_BYTES / max(bytes_per_copy, 1)))


def time_calls(fns, replays: int) -> dict:
    """Median time per call of the closures `fns` (one per rotating copy), in microseconds.

    Captures one pass over all closures in a CUDA graph and times graph replays; falls back
    to timing eager launches when capture fails. Also returns the eager per-call time.
    """
    import torch

    for f in fns:  # warm-up: compiles and autotunes outside the capture
        f()
    torch.cuda.synchronize()
    per_pass = len(fns)
    result = {}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for f in fns:
                f()
        graph.replay()
        torch.cuda.synchronize()
        samples = []
        for _ in range(replays):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / per_pass)
        result["us"] = statistics.median(samples)
        result["method"] = "graph"
        del graph
    except Exception as e:  # noqa: BLE001 - reported in the table
        result["graph_error"] = f"{type(e).__name__}: {e}"[:200]
    samples = []
    for _ in range(max(5, replays // 3)):
        start.record()
        for f in fns:
            f()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / per_pass)
    result["eager_us"] = statistics.median(samples)
    if "us" not in result:
        result["us"] = result["eager_us"]
        result["method"] = "eager"
    return result


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth, (bytes read + bytes written) / s, median of 10."""
    import torch

    n = 512 * 2 ** 20
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        samples.append(2 * n / (start.elapsed_time(end) * 1e-3))
    return statistics.median(samples)


# ----------------------------------------------------------------------------
# torch's int4 baseline
# ----------------------------------------------------------------------------
def make_torch_int4(n, k, group_size, device, seed):
    """(fn(x) -> y, bytes, note) for aten._weight_int4pack_mm, or (None, 0, reason)."""
    import torch

    mm = getattr(torch.ops.aten, "_weight_int4pack_mm", None)
    convert = getattr(torch.ops.aten, "_convert_weight_to_int4pack", None)
    if mm is None or convert is None:
        return None, 0, "torch has no _weight_int4pack_mm/_convert_weight_to_int4pack"
    gen = torch.Generator(device=device).manual_seed(seed)
    try:
        packed_u8 = torch.randint(0, 256, (n, k // 2), generator=gen, device=device, dtype=torch.uint8)
        w = convert(packed_u8, 8)  # two 4-bit integers per byte, [N, K / 2] -> torch's tiled layout
        sz = torch.rand(k // group_size, n, 2, generator=gen, device=device) * 0.01
        sz = sz.to(torch.bfloat16).contiguous()  # [K / G, N, 2]: scale, zero
        x = torch.randn(2, k, device=device, dtype=torch.bfloat16)
        mm(x, w, group_size, sz)
    except Exception as e:  # noqa: BLE001
        return None, 0, f"torch int4 kernel failed: {type(e).__name__}: {str(e)[:120]}"
    nbytes = w.numel() * w.element_size() + sz.numel() * 2
    return (lambda x: mm(x, w, group_size, sz)), nbytes, ""


# ----------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------
def check_correctness(log) -> list[str]:
    """Kernel vs reference on the GPU; returns markdown lines; raises on NaN or a large error."""
    import torch

    from signround_triton.dequant_gemm import GemmConfig, tuned_config
    from signround_triton.reference import reference_linear

    lines = ["| case | M | max err / max ref | config |", "|---|---:|---:|---|"]
    cases = []
    for bits in (2, 3, 4, 8):
        for m in (1, 16, 64, 256):  # autotuned, on the first timed shape's geometry
            cases.append((bits, 128, False, torch.bfloat16, m, 4096, 4096, None))
        for group_size, sym, dtype in ((32, True, torch.float16), (64, False, torch.bfloat16),
                                       (-1, True, torch.bfloat16), (32, False, torch.float16)):
            cases.append((bits, group_size, sym, dtype, 33, 1000, 1024, GemmConfig(32, 64, 64)))
            cases.append((bits, group_size, sym, dtype, 3, 1000, 1024, GemmConfig(16, 64, 128, split_k=4)))
    failures = []
    for bits, group_size, sym, dtype, m, n, k, config in cases:
        packed = random_layer(bits, group_size, sym, n, k, DEVICE, seed=bits * 131 + m)
        x = torch.randn(m, k, device=DEVICE, dtype=dtype)
        y = run_triton(x, packed, config)
        torch.cuda.synchronize()
        label = f"W{bits}G{group_size}{'sym' if sym else 'asym'} {str(dtype)[6:]} {k}x{n}"
        chosen = str(config) if config is not None else (tuned_config(m) or "?")
        if torch.isnan(y).any() or torch.isinf(y).any():
            failures.append(f"{label} M={m}: NaN/inf in the output")
            lines.append(f"| {label} | {m} | NaN/inf | {chosen} |")
            continue
        ref = reference_linear(x, packed)
        err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
        tol = 1e-2 if dtype == torch.float16 else 2e-2
        if err > tol:
            failures.append(f"{label} M={m}: error {err:.2e} > {tol:.0e}")
        lines.append(f"| {label} | {m} | {err:.2e} | {chosen} |")
        log(f"correctness {label} M={m}: {err:.2e}")
    if failures:
        raise SystemExit("kernel_bench: correctness failed on the GPU:\n  " + "\n  ".join(failures))
    return lines


def bench_shapes(args, copy_bw, log, flush) -> list[str]:
    import torch

    from signround_triton.dequant_gemm import GemmConfig, tuned_config

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    forced = GemmConfig.parse(args.config) if args.config else None
    header = ["| K x N | M | bits | Triton us | GB/s | % copy | eager us | config | torch bf16 us | "
              "torch int4 us | x vs bf16 |",
              "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    rows: list[str] = []
    for k, n in _shapes(args.shapes):
        seed = k * 7 + n
        # baselines: bf16 weights [N, K] (rotating), torch int4 (rotating)
        w_bytes = n * k * 2
        dense = [torch.randn(n, k, device=DEVICE, dtype=dtype) for _ in range(copies_for(w_bytes))]
        int4 = []
        int4_note = ""
        if dtype == torch.bfloat16 and args.group_size in (32, 64, 128, 256):
            fn, nbytes, int4_note = make_torch_int4(n, k, args.group_size, DEVICE, seed)
            if fn is not None:
                int4 = [make_torch_int4(n, k, args.group_size, DEVICE, seed + i)[0] for i in range(copies_for(nbytes))]
        else:
            int4_note = "torch int4 needs bf16 and group 32-256"
        layers = {bits: [random_layer(bits, args.group_size, False, n, k, DEVICE, seed + i)
                         for i in range(copies_for(packed_bytes(k, n, bits, args.group_size, False)))]
                  for bits in _ints(args.bits)}
        for m in _ints(args.batches):
            xs = [torch.randn(m, k, device=DEVICE, dtype=dtype) for _ in range(8)]
            t_dense = time_calls([lambda w=w, x=xs[i % 8]: torch.nn.functional.linear(x, w)
                                  for i, w in enumerate(dense)], args.replays)["us"]
            t_int4 = None
            if int4:
                t_int4 = time_calls([lambda f=f, x=xs[i % 8]: f(x) for i, f in enumerate(int4)], args.replays)["us"]
            for bits, copies in layers.items():
                timing = time_calls([lambda p=p, x=xs[i % 8]: run_triton(x, p, forced)
                                     for i, p in enumerate(copies)], args.replays)
                us = timing["us"]
                gbs = layer_bytes(copies[0], m) / (us * 1e-6) / 1e9
                chosen = str(forced) if forced else (tuned_config(m) or "?")
                note = "" if timing.get("method") == "graph" else f" ({timing.get('graph_error', 'eager')})"
                rows.append(f"| {k}x{n} | {m} | {bits} | {us:.1f}{note} | {gbs:.0f} | "
                            f"{100 * gbs * 1e9 / copy_bw:.0f} | {timing['eager_us']:.1f} | {chosen} | "
                            f"{t_dense:.1f} | {'' if t_int4 is None else f'{t_int4:.1f}'} | {t_dense / us:.2f} |")
                log(rows[-1])
            flush(header + rows + ([f"\ntorch int4: {int4_note}"] if int4_note else []))
        del dense, int4, layers
        torch.cuda.empty_cache()
    return header + rows


def compare_word_fetch(args, log) -> list[str]:
    import dataclasses

    import torch

    from signround_triton.dequant_gemm import CONFIGS

    small = CONFIGS[0][2][:3]
    k, n = 4096, 14336
    lines = ["| bits | M | config | packed words us | gathered words us |", "|---:|---:|---|---:|---:|"]
    for bits in (3, 4):
        layers = [random_layer(bits, 128, False, n, k, DEVICE, 99 + i) for i in range(4)]
        for m in (1, 16):
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            for config in small:
                times = []
                for gather in (False, True):
                    c = dataclasses.replace(config, gather_words=gather,
                                            num_stages=min(config.num_stages, 3) if gather else config.num_stages)
                    try:
                        us = time_calls([lambda p=p: run_triton(x, p, c) for p in layers], args.replays)["us"]
                        times.append(f"{us:.1f}")
                    except Exception as e:  # noqa: BLE001
                        times.append(f"failed ({type(e).__name__})")
                lines.append(f"| {bits} | {m} | {config} | {times[0]} | {times[1]} |")
                log(lines[-1])
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("kernel_bench: needs a CUDA GPU (torch.cuda.is_available() is False). On CPU, check the "
              "kernel with `TRITON_INTERPRET=1`: python -m pytest tests/test_triton_kernels.py", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernel_bench: unset TRITON_INTERPRET (the interpreter cannot be timed)", file=sys.stderr)
        return 2
    import triton

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    props = torch.cuda.get_device_properties(0)
    head = [f"# SignRound dequant-GEMM benchmark",
            "",
            f"- device: {props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
            f"{props.total_memory / 2 ** 30:.0f} GiB), torch {torch.__version__}, triton {triton.__version__}",
            f"- command: `{shlex.join(['python', *sys.argv])}`",
            f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"]
    sections: dict[str, list[str]] = {}

    def flush(rows=None, key="timing"):
        if rows is not None:
            sections[key] = rows
        text = "\n".join(head) + "\n"
        for name, lines in sections.items():
            text += f"\n## {name}\n\n" + "\n".join(lines) + "\n"
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
        return text

    t0 = time.time()
    copy_bw = copy_bandwidth()
    head.append(f"- device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write); L2 rotation over >= "
                f"{2 * L2_BYTES / 2 ** 20:.0f} MB per case; bytes = weights + scales + zeros + activations")
    log(head[-1])
    if not args.skip_correctness:
        flush(check_correctness(log), "correctness (GPU vs pure-torch reference)")
        log(f"correctness done in {time.time() - t0:.0f} s")
    bench_shapes(args, copy_bw, log, lambda rows: flush(rows, f"timing (group {args.group_size}, "
                                                              f"{args.dtype}, asym, us per call)"))
    log(f"timing done in {time.time() - t0:.0f} s")
    if args.compare_word_fetch:
        flush(compare_word_fetch(args, log), "word fetch: packed words vs per-(k, n) gathers (4096x14336)")
    text = flush()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
