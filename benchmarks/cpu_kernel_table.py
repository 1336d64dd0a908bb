"""Time the CPU linear-layer paths per batch rows M on one machine, side by side; derive the threshold.

For each layer shape of a model (default: Llama-3.2-1B's qkv, o, gate_up, down; random weights,
W4 group 128 asymmetric) and each M, the median time per call of:

  bf16        torch's bf16 GEMM on the dense weight (F.linear)
  int4pack    PyTorch's int4-pack kernel (`cpu_int4`, the rows threshold set to infinity)
  tiles       the same packed weights dequantized tile by tile into a bf16 GEMM (`cpu_int4`, threshold 0)
  cpuwna16    vLLM's CPUWNA16 kernel (what vLLM's gptq/awq/compressed-tensors methods use here)

Weight copies rotate so each path reads more than twice the last-level cache per round (no call
finds its weights in cache); the paths are interleaved within each repetition, so a slow spell of
the machine hits all of them. The threshold `cpu_int4.INT4PACK_MAX_ROWS[threads]` is the largest M up
to which int4pack beats tiles on the model's layers together (summed once per block); the table
prints the value found and the one in the code for the threads it ran with.

    python benchmarks/cpu_kernel_table.py --out benchmarks/results/cpu-kernel-table.md
    python benchmarks/cpu_kernel_table.py --threads 1 --m 1,2,4,8,16,32,64,96,128 --reps 3 \
        --out benchmarks/results/cpu-kernel-table-1-thread.md
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.benchlib import log, machine  # noqa: E402
from benchmarks.scale import SHAPES, VOCAB  # noqa: E402
from signround_vllm import cpu_int4  # noqa: E402
from signround_vllm.format import LayerQuantSpec, pack_linear  # noqa: E402

PATHS = ("bf16", "int4pack", "tiles", "cpuwna16")
CACHE_BYTES = 32 << 20  # last-level cache of the machines here (read from lscpu when available)


def llc_bytes() -> int:
    try:
        for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
            if (index / "level").read_text().strip() == "3":
                size = (index / "size").read_text().strip()
                return int(size.rstrip("K")) * 1024 if size.endswith("K") else int(size.rstrip("M")) << 20
    except (OSError, ValueError):
        pass
    return CACHE_BYTES


def layer_shapes(key: str) -> list[tuple[str, int, int]]:
    s = SHAPES[key]
    h, i = s["hidden"], s["intermediate"]
    kv = h // s["heads"] * s["kv_heads"]
    return [("qkv", h, h + 2 * kv), ("o", h, h), ("gate_up", h, 2 * i), ("down", i, h)]


def prepared_vllm_layer(packed, spec, k, n):
    """Our `vllm` candidate prepared on one layer outside an engine: (kernel, layer)."""
    from unittest import mock

    import vllm.model_executor.parameter as parameter

    from signround_vllm.kernels import CANDIDATES, LayerGeometry

    layer = torch.nn.Module()
    for name, t in packed.tensors("").items():
        layer.register_parameter(name.lstrip("."), torch.nn.Parameter(t.clone(), requires_grad=False))
    layer.bias = None
    kernel = CANDIDATES["vllm"](LayerGeometry("bench", spec, k, n, torch.bfloat16, torch.device("cpu")))
    # one rank: there is no process group outside an engine
    with mock.patch.object(parameter, "get_tensor_model_parallel_rank", lambda: 0), \
            mock.patch.object(parameter, "get_tensor_model_parallel_world_size", lambda: 1):
        kernel.prepare(layer)
    return kernel, layer


def vllm_kernel(packed, spec, k, n):
    """vLLM's CPUWNA16 for this layer, through our `vllm` candidate (outside an engine)."""
    kernel, layer = prepared_vllm_layer(packed, spec, k, n)
    VLLM_RAN_AS.add(kernel.describe())
    return lambda x: kernel.apply(layer, x)


VLLM_RAN_AS: set[str] = set()  # what our `vllm` candidate said it runs (W4A8 when VLLM_CPU_INT4_W4A8=1)


def make_paths(k: int, n: int, seed: int, copies: dict[str, int], with_vllm: bool) -> dict[str, list]:
    """For each path, `copies[path]` callables x -> y, each on its own copy of the weights."""
    spec = LayerQuantSpec(4, 128, False)
    out: dict[str, list] = {p: [] for p in PATHS}
    for c in range(max(copies.values())):
        gen = torch.Generator().manual_seed(seed + c)
        q = torch.randint(0, 16, (n, k), generator=gen)
        packed = pack_linear(q, torch.rand(n, k // 128, generator=gen) * 0.01,
                             torch.randint(0, 16, (n, k // 128), generator=gen), spec)
        if c < copies["bf16"]:
            dense = torch.randn(n, k, generator=gen).to(torch.bfloat16)
            out["bf16"].append(lambda x, w=dense: torch.nn.functional.linear(x, w))
        w = cpu_int4.to_int4pack(packed, torch.bfloat16)
        if c < copies["int4pack"]:
            out["int4pack"].append(lambda x, w=w: cpu_int4.int4pack_linear(
                x, w.packed, w.scale_offset, None, w.group_size, max_rows=1 << 30))
            out["tiles"].append(lambda x, w=w: cpu_int4.int4pack_linear(
                x, w.packed, w.scale_offset, None, w.group_size, max_rows=0))
        if with_vllm and c < copies["int4pack"]:
            out["cpuwna16"].append(vllm_kernel(packed, spec, k, n))
    return {p: fns for p, fns in out.items() if fns}


def time_paths(paths: dict[str, list], x: torch.Tensor, reps: int, min_seconds: float) -> dict[str, float]:
    """Median seconds per call of each path; paths interleaved within each repetition."""
    samples: dict[str, list[float]] = {p: [] for p in paths}
    for fns in paths.values():  # warm-up: first calls allocate and page in
        for f in fns:
            f(x)
    for _ in range(reps):
        for p, fns in paths.items():
            calls, t0 = 0, time.perf_counter()
            while True:
                fns[calls % len(fns)](x)
                calls += 1
                elapsed = time.perf_counter() - t0
                if elapsed >= min_seconds and calls >= len(fns):
                    break
            samples[p].append(elapsed / calls)
    return {p: statistics.median(v) for p, v in samples.items()}


def threshold(times: dict[tuple[str, int], dict[str, float]], shapes, ms) -> int:
    """Largest M such that int4pack beats tiles on the layers together at every M up to it."""
    best = 0
    for m in ms:
        kernel = sum(times[(name, m)]["int4pack"] for name, _, _ in shapes)
        tiles = sum(times[(name, m)]["tiles"] for name, _, _ in shapes)
        if kernel > tiles:
            break
        best = m
    return best


def render(args, shapes, ms, times, found: int, extra_shapes=()) -> str:
    lines = [f"# CPU linear-layer paths per batch rows M ({SHAPES[args.shape]['name']} layer shapes)", "",
             f"Machine: {machine()}, {torch.get_num_threads()} threads. Command: "
             f"`python benchmarks/cpu_kernel_table.py {shlex.join(args.argv)}`", "",
             "Median microseconds per call (W4 group 128 asymmetric, bf16 activations, random weights; weight "
             f"copies rotate past the {llc_bytes() >> 20} MiB last-level cache; paths interleaved, "
             f"{args.reps} repetitions). Ratio = bf16 time / path time (above 1: faster than bf16)."
             + (f" vLLM CPUWNA16 ran as: {'; '.join(sorted(VLLM_RAN_AS))}." if VLLM_RAN_AS else ""), "",
             "| layer (K x N) | M | bf16 | int4pack | tiles | vLLM CPUWNA16 | int4pack vs bf16 | tiles vs bf16 "
             "| CPUWNA16 vs bf16 |", "|---|---|---|---|---|---|---|---|---|"]
    for name, k, n in [*shapes, *extra_shapes]:
        for m in ms:
            t = times[(name, m)]
            us = [f"{t[p] * 1e6:.0f}" if p in t else "-" for p in PATHS]
            ratio = [f"{t['bf16'] / t[p]:.2f}x" if p in t else "-" for p in PATHS[1:]]
            lines.append(f"| {name} ({k} x {n}) | {m} | " + " | ".join(us + ratio) + " |")
    if extra_shapes:
        lines += ["", f"{', '.join(name for name, _, _ in extra_shapes)}: timed alone, not part of the block below "
                      "(lm_head sees only the rows being sampled: one per sequence)."]
    lines += ["", "All layers of one block together:", "",
              "| M | bf16 | int4pack | tiles | vLLM CPUWNA16 | chosen (cpu_int4) vs bf16 | chosen vs CPUWNA16 |",
              "|---|---|---|---|---|---|---|"]
    for m in ms:
        total = {p: sum(times[(name, m)].get(p, float("nan")) for name, _, _ in shapes) for p in PATHS}
        chosen = total["int4pack"] if m <= cpu_int4.max_rows_for(torch.get_num_threads()) else total["tiles"]
        lines.append(f"| {m} | " + " | ".join(f"{total[p] * 1e6:.0f}" for p in PATHS)
                     + f" | {total['bf16'] / chosen:.2f}x | {total['cpuwna16'] / chosen:.2f}x |")
    lines += ["", f"Threshold from this table: int4pack up to M = {found} (largest measured M at which it beats "
              f"tiles at every M up to it); in the code for {torch.get_num_threads()} thread(s): "
              f"{cpu_int4.max_rows_for(torch.get_num_threads())} (`cpu_int4.INT4PACK_MAX_ROWS` = "
              f"{cpu_int4.INT4PACK_MAX_ROWS}).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1b", choices=sorted(k for k, s in SHAPES.items() if "experts" not in s))
    ap.add_argument("--m", default="1,2,4,8,16,32,64,96,128,192,256", help="batch rows, comma-separated")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=0.1, help="per path per repetition")
    ap.add_argument("--no-vllm", action="store_true", help="leave out vLLM's CPUWNA16 kernel")
    ap.add_argument("--threads", type=int, help="torch threads (default: as torch starts; vLLM's CPU worker on a "
                                                 "2-core machine reserves one core and runs on 1 thread)")
    ap.add_argument("--lm-head", action="store_true",
                    help="also time the output layer (hidden x vocabulary), apart from the block's layers")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ms = [int(v) for v in args.m.split(",")]
    shapes = layer_shapes(args.shape)
    extra = ([("lm_head", SHAPES[args.shape]["hidden"], SHAPES[args.shape].get("vocab", VOCAB))]
             if args.lm_head else [])
    times: dict[tuple[str, int], dict[str, float]] = {}
    for i, (name, k, n) in enumerate([*shapes, *extra]):
        bytes4, bytes16 = k * n // 2, k * n * 2
        copies = {"bf16": -(-2 * llc_bytes() // bytes16), "int4pack": -(-2 * llc_bytes() // bytes4)}
        paths = make_paths(k, n, seed=1000 * i, copies=copies, with_vllm=not args.no_vllm)
        for m in ms:
            x = torch.randn(m, k).to(torch.bfloat16)
            times[(name, m)] = time_paths(paths, x, args.reps, args.min_seconds)
            log("cpu-table", f"{name} {k}x{n} M={m}: " + ", ".join(f"{p} {t * 1e6:.0f} us"
                                                                 for p, t in times[(name, m)].items()))
        del paths
    found = threshold(times, shapes, ms)
    text = render(args, shapes, ms, times, found, extra)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
