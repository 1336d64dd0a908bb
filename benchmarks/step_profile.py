"""Where one tuning step's time goes: a real block of the default model, tuned as the tuner tunes it.

Runs `tune_block` on one decoder block of SmolLM2-135M-Instruct (its inputs and full-precision targets from
built-in Wikipedia calibration windows, as the tuner captures them), first timed plainly (median step from
the iteration callback, after a warm-up run that also compiles), then under torch.profiler, and splits the
profiled step into the block matmuls, the attention's forward and backward, and everything else (fake
quantization, norms, rotary embedding, activation, loss, signed steps, Python).

    python benchmarks/step_profile.py --bits 3 --group-size 64 --block 10 --out benchmarks/results/step-profile.md
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import benchlib  # noqa: E402

# Profiler rows by what they are; everything not named here is "other".
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")
ATTENTION_FORWARD = "aten::_scaled_dot_product_flash_attention_for_cpu"
ATTENTION_BACKWARD = "aten::_scaled_dot_product_flash_attention_for_cpu_backward"


def log(msg: str) -> None:
    benchlib.log("step-profile", msg)


def block_and_data(block_index: int, n_samples: int, seq_len: int, seed: int, autocast: bool):
    """The block, its inputs and full-precision targets on the calibration windows, its call arguments, and
    each weight's input energy (the clipping search's weights, measured as blockwise.InputEnergy measures them
    for the tuner)."""
    from transformers import AutoModelForCausalLM

    from offline_tuner.architecture import find_decoder_blocks, record_block_calls
    from offline_tuner.blockwise import InputEnergy
    from offline_tuner.default_model import prepare_default_model
    from offline_tuner.quantize import Calibration, calibration_windows
    from offline_tuner.streams import run_block_in_place

    model_dir = prepare_default_model(progress=log)
    windows = calibration_windows(model_dir, Calibration(n_samples, seq_len), seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    blocks = find_decoder_blocks(model)
    if not 0 <= block_index < len(blocks):
        raise SystemExit(f"--block {block_index}: the model has blocks 0..{len(blocks) - 1}")
    calls = record_block_calls(model, blocks, windows, torch.device("cpu"))
    stream = calls.first_inputs
    with torch.no_grad():
        for i in range(block_index):
            run_block_in_place(blocks.blocks[i], stream, calls.block_kwargs[i], 8, autocast)
        inputs = stream.clone()
        block = blocks.blocks[block_index]
        energy = InputEnergy(block, [n for n, p in block.named_parameters() if is_tuned(n, p)])
        try:
            run_block_in_place(block, stream, calls.block_kwargs[block_index], 8, autocast)
        finally:
            energy.close()
    return block, inputs, stream, calls.block_kwargs[block_index], energy.means()


def is_tuned(name: str, p: torch.Tensor) -> bool:
    """The block's weights this profile tunes: every matrix (a Llama block's seven linear layers)."""
    return name.endswith(".weight") and p.dim() >= 2


def split_profile(events, steps: int) -> dict[str, float]:
    """Self CPU time per step in ms: matmuls, attention forward, attention backward, other, total."""
    parts = {"matmuls": 0.0, "attention forward": 0.0, "attention backward": 0.0, "other": 0.0}
    for e in events:
        ms = e.self_cpu_time_total / 1000
        if e.key in MATMUL_OPS:
            parts["matmuls"] += ms
        elif e.key == ATTENTION_FORWARD:
            parts["attention forward"] += ms
        elif e.key == ATTENTION_BACKWARD:
            parts["attention backward"] += ms
        else:
            parts["other"] += ms
    parts["total"] = sum(parts.values())
    return {k: v / steps for k, v in parts.items()}


def main(argv=None) -> int:
    from signround_vllm.format import LayerQuantSpec
    from offline_tuner.quantize import RECIPES
    from offline_tuner.signround import TuneSettings, tune_block, use_bf16_autocast

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--sym", action="store_true")
    p.add_argument("--recipe", default="cpu-demo", choices=list(RECIPES), help="iterations, batch and windows")
    p.add_argument("--block", type=int, default=10, help="which decoder block (default 10)")
    p.add_argument("--compile", default="on", choices=["on", "off"])
    p.add_argument("--profiled-iters", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", help="also write the markdown report to this .md file (and its numbers, .json)")
    args = p.parse_args(argv)

    tune, calib = RECIPES[args.recipe]
    settings = TuneSettings(iters=tune.iters, batch_size=tune.batch_size, compile=args.compile, seed=args.seed)
    autocast = use_bf16_autocast(settings, torch.device("cpu"))
    block, inputs, targets, kwargs, importance = block_and_data(args.block, calib.n_samples, calib.seq_len,
                                                                args.seed, autocast)
    spec = LayerQuantSpec(bits=args.bits, group_size=args.group_size, sym=args.sym)
    params = {n: p for n, p in block.named_parameters() if is_tuned(n, p)}
    specs = {n: spec for n in params}

    def run(s: TuneSettings) -> tuple[list[float], float]:
        stamps: list[float] = []
        result = tune_block(block, params, specs, inputs, targets, kwargs, s, args.seed,
                            progress=lambda it, loss: stamps.append(time.perf_counter()), importance=importance)
        return [b - a for a, b in zip(stamps, stamps[1:])], result.seconds

    log(f"warm-up run of block {args.block} ({settings.iters} iterations, compile {args.compile})")
    _, first_seconds = run(settings)
    steps, seconds = run(settings)
    median_ms = 1000 * statistics.median(steps)
    log(f"median step {median_ms:.1f} ms; profiling {args.profiled_iters} iterations")
    from torch.profiler import profile

    profiled = dataclasses.replace(settings, iters=args.profiled_iters)
    with profile() as prof:
        run(profiled)
    # The profiled run also holds the block's setup (the clipping search, for settings that have one) and the two
    # evaluations on one batch at the end (forward only), counted in as shares of the parts: an overstatement of
    # the per-step figures, small with no search and the default 10 iterations.
    parts = split_profile(prof.key_averages(), args.profiled_iters)

    setting = spec.short_name()
    rows = [[name, f"{ms:.1f} ms", f"{100 * ms / parts['total']:.0f}%"] for name, ms in parts.items()]
    report = "\n".join([
        f"# One tuning step, profiled: block {args.block} of SmolLM2-135M-Instruct",
        "",
        f"Machine: {benchlib.machine(('torch', 'transformers'))}. Date: {time.strftime('%Y-%m-%d %H:%M')}.",
        f"Command: `python benchmarks/step_profile.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"Setting: {setting}, recipe {args.recipe} ({settings.iters} iterations, batch {settings.batch_size} of "
        f"{calib.seq_len} tokens), compile {args.compile}, bf16 matmuls: {autocast}.",
        "",
        f"Without the profiler: median step {median_ms:.1f} ms over {len(steps)} steps (block tuned in "
        f"{seconds:.2f} s; the first run, which compiles, {first_seconds:.2f} s).",
        "",
        f"Under torch.profiler ({args.profiled_iters} iterations; self CPU time per step, profiler overhead "
        "included, the two evaluation forwards at the end counted in):",
        "",
        *benchlib.markdown_table(["part", "per step", "share"], rows),
        "",
    ])
    print(report)
    if args.out:
        out = Path(args.out)
        benchlib.write_report(out.parent, out.stem, report, {
            "machine": benchlib.machine_info(("torch", "transformers")), "setting": setting, "block": args.block,
            "median_step_ms": median_ms, "profile_ms_per_step": parts, "recipe": args.recipe})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
