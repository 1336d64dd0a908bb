"""Tuning speed: whole SignRound runs of this checkout (and of an older commit) against auto-round, side by side.

Each round runs every tuner once, one after the other, on the very same calibration windows and settings;
rounds alternate who goes first. Reported per run: the tool's own time, the process's wall time and peak
RSS, and SignRound's seconds per block (from its run log). Ratios are to auto-round in the same round, so
they stay meaningful on a machine whose speed drifts.

    python benchmarks/tuning_speed.py --bits 3 --group-size 64 --recipe cpu-demo --baseline e38f1df \
        --rounds 2 --out benchmarks/results/tuning-speed-cpu-2.md

--baseline REV runs `python -m offline_tuner.cli` from a detached worktree of that commit (made once under
--work), with this checkout's venv.

The report also gives the run's matmul floor (`matmul_floor`): the block matmuls that signed gradient descent
cannot skip (each step's forward, the weight gradients, the input gradients back to the first layers), timed
here at the run's shapes and dtype, times steps and blocks. No tuner of this algorithm at these settings can
take less, so it shows how far a time target is from the hardware.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import benchlib  # noqa: E402
from benchmarks.benchlib import write_report  # noqa: E402
from offline_tuner.default_model import cache_root  # noqa: E402


def log(msg: str) -> None:
    benchlib.log("tuning-speed", msg)


def baseline_tree(rev: str, work: Path) -> tuple[Path, str]:
    """A detached worktree of `rev` under `work` (reused), and the commit it resolved to."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                            capture_output=True, text=True)
    if commit.returncode != 0:
        raise SystemExit(f"--baseline {rev}: not a commit of this repository ({commit.stderr.strip()})")
    sha = commit.stdout.strip()
    tree = work / f"tree-{sha[:10]}"
    if not (tree / "offline_tuner").is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(tree), sha], check=True,
                       capture_output=True)
    return tree, sha


def tree_env(tree: Path) -> dict:
    """The environment that makes `python -m offline_tuner.cli` import the tuner of `tree`, ahead of the venv's
    editable install of this checkout."""
    return {**os.environ, "PYTHONPATH": str(tree)}


def per_block_seconds(run: dict) -> tuple[float | None, float | None]:
    """(first block, median of the others) from a SignRound run log's blocks."""
    secs = [b["seconds"] for b in run.get("blocks", [])]
    if not secs:
        return None, None
    return secs[0], (statistics.median(secs[1:]) if len(secs) > 1 else None)


def main(argv=None) -> int:
    from offline_tuner.default_model import prepare_default_model
    from offline_tuner.quantize import RECIPES, Calibration, calibration_windows
    from benchmarks.quality import anchor_command, ensure_autoround_venv

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--sym", action="store_true")
    p.add_argument("--recipe", default="cpu-demo", choices=list(RECIPES))
    p.add_argument("--iters", type=int, help="override the recipe's iterations per block (every tuner)")
    p.add_argument("--n-samples", type=int, help="override the recipe's calibration windows")
    p.add_argument("--seq-len", type=int, help="override the recipe's tokens per window")
    p.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--baseline", help="also time the tuner of this git commit (a worktree under --work)")
    p.add_argument("--signround-args", default="", help="extra arguments for this checkout's SignRound runs")
    p.add_argument("--autoround", action=argparse.BooleanOptionalAction, default=True,
                   help="time PyPI auto-round 0.16.1 too (its own venv, as benchmarks/quality.py makes it)")
    p.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                   help="time the run's unavoidable block matmuls on this machine (matmul_floor; about 20 s)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", help="also write the markdown report to this .md file (and its numbers, .json)")
    p.add_argument("--work", default=str(cache_root() / "bench-tuning-speed"))
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")

    tune, calib = RECIPES[args.recipe]
    iters = args.iters if args.iters is not None else tune.iters
    batch = args.batch_size or tune.batch_size
    calib = Calibration(args.n_samples or calib.n_samples, args.seq_len or calib.seq_len)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_default_model(progress=log)
    calib_file = work / f"calibration-seed{args.seed}.pt"
    torch.save(calibration_windows(model_dir, calib, args.seed), calib_file)
    setting = ["--bits", str(args.bits), "--group-size", str(args.group_size)]
    sr_args = [*setting, *(["--sym"] if args.sym else []), "--recipe", args.recipe, "--iters", str(iters),
               "--batch-size", str(batch), "--n-samples", str(calib.n_samples), "--seq-len", str(calib.seq_len),
               "--seed", str(args.seed)]

    # label -> (its command for an --out folder, working directory, environment (None: this one), the run log it
    # writes in that folder)
    tuners: dict[str, tuple[Callable[[Path], list[str]], Path, dict | None, str]] = {}

    def signround(extra=()):
        return lambda out: [sys.executable, "-m", "offline_tuner.cli", "quantize", str(model_dir), "--out", str(out),
                            "--overwrite", *sr_args, *extra]

    if args.baseline:
        tree, sha = baseline_tree(args.baseline, work)
        tuners[f"SignRound {sha[:7]}"] = (signround(), tree, tree_env(tree), "signround_run.json")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "offline_tuner", "signround_vllm"],
                           capture_output=True, text=True).stdout.strip()
    this = f"SignRound {head}{' + changes' if dirty else ''}"
    tuners[this] = (signround(args.signround_args.split()), REPO, tree_env(REPO), "signround_run.json")
    if args.autoround:
        python = ensure_autoround_venv()
        tuners["auto-round 0.16.1"] = (
            lambda out: anchor_command("autoround", python, model_dir, out, calib_file, setting, iters, batch,
                                       args.seed, args.sym), REPO, None, "run.json")

    loads, runs = benchlib.LoadWatch(), []
    for r in range(args.rounds):
        order = list(tuners) if r % 2 == 0 else list(tuners)[::-1]
        for label in order:
            command_for, cwd, env, run_log = tuners[label]
            out_dir = work / f"out-{len(runs)}"
            log(f"round {r + 1}: {label}")
            loads.sample()
            measured = benchlib.run_measured(command_for(out_dir), work / "logs" / f"{out_dir.name}.log",
                                             args.timeout, env=env, cwd=cwd)
            loads.sample()
            if not measured.ok:
                raise SystemExit(f"{label} failed (exit {measured.returncode}, {measured.stopped or 'no stop'}); "
                                 f"see {work / 'logs' / (out_dir.name + '.log')}")
            run = json.loads((out_dir / run_log).read_text())
            first, median = per_block_seconds(run)
            runs.append({"round": r + 1, "tuner": label, "tool_seconds": run["seconds"], "wall": measured.seconds,
                         "peak_rss_bytes": measured.peak_rss_bytes, "first_block": first, "median_block": median})
            log(f"{label}: tool {run['seconds']:.1f} s, process {measured.seconds:.1f} s")

    floor = matmul_floor(model_dir, iters, batch, calib.seq_len) if args.floor else None
    report = render(args, argv, runs, calib, iters, batch, loads, floor)
    print(report)
    if args.out:
        out = Path(args.out)
        write_report(out.parent, out.stem, report, {"machine": benchlib.machine_info(("torch", "transformers")),
                                                    "runs": runs, "matmul_floor": floor,
                                                    "iters": iters, "batch_size": batch,
                                                    "calibration": [calib.n_samples, calib.seq_len]})
    return 0


def matmul_floor(model_dir: Path, iters: int, batch: int, seq_len: int, repeats: int = 5) -> dict:
    """The block matmuls every SignRound tuner must run at these settings, timed on this machine.

    Per step and linear layer of a block: the forward (x W^T), the weight's gradient (g^T x, which the rounding
    offsets' gradient needs) and, for every layer whose input depends on another tuned layer of the block, the
    input's gradient (g W). The first layers (those that share the first-called layer's input, found by hooks
    on block 0: q, k and v in a Llama block) need no input gradient. Timed with torch.mm at the layer's shapes
    in the dtype the tuning runs them in (bf16 where use_bf16_autocast holds), best of `repeats`; attention,
    norms, activations and the fake quantization are left out, so the real floor is higher still."""
    import transformers
    from offline_tuner.architecture import find_decoder_blocks, record_block_calls
    from offline_tuner.signround import TuneSettings, run_block, use_bf16_autocast

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    blocks = find_decoder_blocks(model)
    calls = record_block_calls(model, blocks, torch.zeros(1, 8, dtype=torch.long), torch.device("cpu"))
    block = blocks.blocks[0]
    linears = [(n, m) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    inputs: dict[str, torch.Tensor] = {}  # each layer's input on its first call (kept, so identity is meaningful)
    hooks = [m.register_forward_pre_hook(lambda _m, a, _n=n: inputs.setdefault(_n, a[0])) for n, m in linears]
    with torch.no_grad():
        run_block(block, calls.first_inputs, calls.block_kwargs[0])
    for h in hooks:
        h.remove()
    first = inputs[next(iter(inputs))]
    first_layers = sorted(n for n, x in inputs.items() if x is first)
    n_blocks = len(blocks)
    del model, blocks, block, calls, inputs, first
    dtype = torch.bfloat16 if use_bf16_autocast(TuneSettings(), torch.device("cpu")) else torch.float32
    tokens = batch * seq_len

    def best_ms(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1000 * min(times)

    per_step_ms, flops = 0.0, 0
    for name, m in linears:
        n_out, k_in = m.weight.shape
        x, w, g = (torch.randn(tokens, k_in, dtype=dtype), torch.randn(n_out, k_in, dtype=dtype),
                   torch.randn(tokens, n_out, dtype=dtype))
        per_step_ms += best_ms(lambda: x @ w.t()) + best_ms(lambda: g.t() @ x)
        flops += 2 * 2 * tokens * n_out * k_in
        if name not in first_layers:
            per_step_ms += best_ms(lambda: g @ w)
            flops += 2 * tokens * n_out * k_in
    steps = iters * n_blocks
    return {"dtype": str(dtype).replace("torch.", ""), "blocks": n_blocks, "steps": steps,
            "linear_layers": len(linears), "first_layers": first_layers,
            "ms_per_step": round(per_step_ms, 2), "gflop_per_step": round(flops / 1e9, 2),
            "gflops_per_s": round(flops / 1e9 / (per_step_ms / 1000), 1), "seconds": round(steps * per_step_ms / 1000, 1)}


def render(args, argv, runs, calib, iters, batch, loads, floor=None) -> str:
    secs = lambda v: f"{v:.1f} s" if v is not None else ""  # noqa: E731
    rows = []
    for run in runs:
        anchor = next((a for a in runs if a["round"] == run["round"] and a["tuner"].startswith("auto-round")), None)
        ratio = f"{run['tool_seconds'] / anchor['tool_seconds']:.2f}" if anchor else ""
        wall_ratio = f"{run['wall'] / anchor['wall']:.2f}" if anchor else ""
        rows.append([str(run["round"]), run["tuner"], secs(run["tool_seconds"]), secs(run["wall"]),
                     secs(run["first_block"]), secs(run["median_block"]), f"{run['peak_rss_bytes'] / 2**30:.2f} GiB",
                     ratio, wall_ratio])
    command = "python benchmarks/tuning_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    setting = f"W{args.bits}G{args.group_size}{'sym' if args.sym else 'asym'}"
    return "\n".join([
        f"# Tuning speed: SignRound against auto-round 0.16.1, side by side",
        "",
        f"Machine: {benchlib.machine(('torch', 'transformers'))}; {loads.describe()}. "
        f"Date: {time.strftime('%Y-%m-%d %H:%M')}.",
        f"Command: `{command}`",
        f"Setting: {setting}, {iters} iterations per block, {calib.n_samples} x {calib.seq_len} calibration tokens "
        f"(the same windows for every tuner, seed {args.seed}), batch {batch}. Rounds alternate who goes first.",
        "Tool time: SignRound's own figure (model load, calibration, tuning, packing, writing); auto-round's covers "
        "calibration and tuning (its driver loads the model before the clock starts). Process: wall time of the "
        "whole process, Python start and imports included. Blocks: SignRound's seconds per block from its run log "
        "(tuning, packing and writing one block), the first and the median of the others.",
        "",
        *benchlib.markdown_table(["round", "tuner", "tool time", "process", "first block", "median block",
                                  "peak RSS", "tool time / auto-round's", "process / auto-round's"], rows),
        "",
        *(floor_lines(floor, runs) if floor else []),
    ])


def floor_lines(floor: dict, runs: list[dict]) -> list[str]:
    anchors = [r["tool_seconds"] for r in runs if r["tuner"].startswith("auto-round")]
    half = f" Half of auto-round's tool time here: {min(anchors) / 2:.1f}-{max(anchors) / 2:.1f} s." if anchors else ""
    return [
        f"Matmul floor (`matmul_floor`, measured after the runs): {floor['steps']} steps ({floor['blocks']} blocks) x "
        f"{floor['ms_per_step']:.1f} ms of {floor['dtype']} block matmuls ({floor['gflop_per_step']:.1f} GFLOP per step "
        f"at {floor['gflops_per_s']:.0f} GFLOP/s: forward and weight gradients of all {floor['linear_layers']} linear "
        f"layers, input gradients of all but {', '.join(floor['first_layers'])}) = **{floor['seconds']:.1f} s** that "
        f"any tuner of this algorithm runs at these settings, before attention, norms, activations, fake "
        f"quantization, calibration, loading and writing.{half}",
        "",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
