"""Scale benchmark: peak memory and time of quantizing Llama-3.x-shaped models, SignRound vs auto-round.

    .venv/bin/python benchmarks/scale.py                          # all shapes, both tools
    .venv/bin/python benchmarks/scale.py --shapes 1b --no-autoround --signround-blocks 2

Random weights with the shapes of Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B are written once as bf16
shards into .cache/scale/ (speed and memory do not depend on the weight values; the 8B shape needs
about 16 GB of disk, checked first). Each tool runs in its own process, measured from outside (peak
anonymous and resident memory of the process tree, polled from /proc), under a memory cap so that a run
that would exhaust the machine is stopped and reported as such. Tuning (`cpu-demo` recipe: 40 iterations,
32 x 256 tokens, batch 4; auto-round gets the very same windows) is stopped after --signround-blocks
blocks: every block has the same shape, so the peak is that of the whole run (plus the final copy of the
embeddings, which round-to-nearest measures), and the report gives the per-block time. Writes a markdown
report (and JSON) to --out.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.benchlib import GiB, Measured, idle_baseline_bytes, log, machine, run_measured  # noqa: E402

SHAPES = {  # Llama 3.x dimensions (vocabulary 128256); a mixture of experts with Qwen3-30B-A3B's blocks
    "1b": dict(name="Llama-3.2-1B", hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, tie=True),
    "3b": dict(name="Llama-3.2-3B", hidden=3072, intermediate=8192, layers=28, heads=24, kv_heads=8, tie=True),
    "8b": dict(name="Llama-3.1-8B", hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, tie=False),
    # 6 of the model's 48 blocks (8.7 GB in bf16 instead of 61): every block has the same shape, so speed
    # ratios per block hold, while the whole model would not fit this machine's memory.
    "30b-a3b": dict(name="Qwen3-30B-A3B-6of48blocks", family="qwen3_moe", hidden=2048, layers=6, heads=32,
                    kv_heads=4, head_dim=128, experts=128, experts_per_token=8, expert_intermediate=768,
                    intermediate=6144, vocab=151936, tie=False),
}
VOCAB = 128256  # Llama 3.x
SCALE_DIR = REPO / ".cache" / "scale"
COMPLETE = ".complete"


def tag(msg: str) -> None:
    log("scale", msg)


def shape_config(shape: dict, bos: int = 1, eos: int = 2):
    """The transformers config (bf16) of a shape."""
    import torch
    from transformers import CONFIG_MAPPING

    settings = dict(vocab_size=shape.get("vocab", VOCAB), hidden_size=shape["hidden"],
                    intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                    num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                    tie_word_embeddings=shape["tie"], max_position_embeddings=8192, bos_token_id=bos,
                    eos_token_id=eos, dtype=torch.bfloat16)
    if "head_dim" in shape:
        settings["head_dim"] = shape["head_dim"]
    family = shape.get("family", "llama")
    if family == "qwen3_moe":
        settings.update(num_experts=shape["experts"], num_experts_per_tok=shape["experts_per_token"],
                        moe_intermediate_size=shape["expert_intermediate"], decoder_sparse_step=1,
                        norm_topk_prob=True, mlp_only_layers=[])
    return CONFIG_MAPPING[family](**settings)


def model_params(shape: dict) -> int:
    """Parameters of a shape (tied weights once), counted on an empty model."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(shape_config(shape))
    return sum(p.numel() for p in model.parameters())


def is_moe(shape: dict) -> bool:
    return "experts" in shape


def write_random_model(key: str) -> Path:
    """The shape's random bf16 model as 5 GB shards under the names its real checkpoints use (per-expert
    tensors for a mixture of experts), written tensor by tensor (bounded memory); once."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offline_tuner.default_model import prepare_default_model
    from offline_tuner.model_source import tied_parameter_names
    from offline_tuner.stored_layout import row_count, stored_layout
    from signround_vllm.shards import ShardedWriter, TensorEntry

    shape = SHAPES[key]
    folder = SCALE_DIR / shape["name"]
    if (folder / COMPLETE).is_file():
        return folder
    params = model_params(shape)
    need = params * 2 * 1.1
    SCALE_DIR.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(SCALE_DIR).free
    if free < need:
        raise SystemExit(f"{shape['name']}: needs about {need / 1e9:.0f} GB of free disk for its shards, "
                         f"{free / 1e9:.0f} GB free")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(prepare_default_model())
    config = shape_config(shape, tokenizer.bos_token_id, tokenizer.eos_token_id)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    tied = tied_parameter_names(model)
    names = [n for n, _ in model.named_parameters() if n not in tied]
    state = dict(model.named_parameters())
    entries = []  # (stored name, shape)
    for name, pieces in stored_layout(model, names).pieces.items():
        full = tuple(state[name].shape)
        for piece in pieces:
            stored_shape = full if piece.rows == row_count(full) else (piece.rows, full[-1])  # one expert's rows
            entries.append(TensorEntry(piece.stored, torch.bfloat16, stored_shape))
    writer = ShardedWriter(folder, entries)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for e in entries:
        value = (torch.ones(e.shape) if "norm" in e.name else torch.randn(e.shape, generator=gen) * 0.02)
        writer.write(e.name, value.to(torch.bfloat16))
    writer.finish()
    config.architectures = [type(model).__name__]  # vLLM picks the model class from it
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / COMPLETE).write_text(json.dumps({"params": params}))
    tag(f"wrote {shape['name']} ({params / 1e9:.2f}B parameters) in {time.perf_counter() - t0:.0f} s")
    return folder


def block_seconds(log_text: str) -> list[float]:
    return [float(m) for m in re.findall(r"block \d+/\d+: loss .*?, ([0-9.]+) s", log_text)]


def run_signround(model: Path, work: Path, iters_args: list[str], blocks: int | None, cap: int, name: str) -> dict:
    out = work / f"signround-{name}"
    cmd = [str(Path(sys.executable).with_name("signround")), "quantize", str(model), "--out", str(out),
           "--overwrite", "--bits", "4", "--group-size", "128", *iters_args]
    done = {"n": 0}

    def enough(line: str) -> bool:
        if re.search(r"block \d+/\d+: loss", line):
            done["n"] += 1
        return blocks is not None and done["n"] >= blocks

    log_path = work / f"signround-{name}.log"
    m = run_measured(cmd, log_path, timeout_s=6 * 3600, memory_cap_bytes=cap, enough=enough)
    shutil.rmtree(out, ignore_errors=True)
    return result_row("signround", name, m, block_seconds(log_path.read_text()), log_path)


def result_row(tool: str, mode: str, m: Measured, per_block: list[float], log_path: Path) -> dict:
    return {"tool": tool, "mode": mode, "seconds": round(m.seconds, 1), "peak_anon_gib": round(m.peak_anon_bytes / GiB, 2),
            "peak_rss_gib": round(m.peak_rss_bytes / GiB, 2), "returncode": m.returncode, "stopped": m.stopped,
            "blocks_timed": len(per_block), "seconds_per_block": round(sum(per_block) / len(per_block), 1) if per_block else None,
            "log": str(log_path.relative_to(REPO))}


def run_autoround(model: Path, work: Path, iters: int, cap: int, name: str, blocks: int | None) -> dict:
    """auto-round with its low-memory options; tuning on the very windows SignRound's cpu-demo recipe draws."""
    import torch

    from benchmarks.quality import ensure_autoround_venv
    from offline_tuner.quantize import RECIPES, calibration_windows

    python = ensure_autoround_venv()
    tune, calib = RECIPES["cpu-demo"]
    cmd = [str(python), str(REPO / "benchmarks" / "autoround_scale_driver.py"), str(model), "--bits", "4",
           "--group-size", "128", "--iters", str(iters)]
    if iters:
        windows_file = work / "calibration.pt"
        torch.save(calibration_windows(model, calib, tune.seed), windows_file)
        cmd += ["--calibration", str(windows_file), "--batch-size", str(tune.batch_size)]
    done = {"blocks": 0, "seconds": None}  # from auto-round's own progress bar: "k/N [mm:ss<..."

    def enough(line: str) -> bool:
        m = re.search(r"\| *(\d+)/\d+ \[(?:(\d+):)?(\d+):(\d+)<", line)
        if m and int(m.group(1)) > done["blocks"]:
            done["blocks"] = int(m.group(1))
            h, mm, ss = int(m.group(2) or 0), int(m.group(3)), int(m.group(4))
            done["seconds"] = 3600 * h + 60 * mm + ss
        return blocks is not None and done["blocks"] >= blocks

    log_path = work / f"autoround-{name}.log"
    m = run_measured(cmd, log_path, timeout_s=6 * 3600, memory_cap_bytes=cap, enough=enough)
    per_block = [done["seconds"] / done["blocks"]] * done["blocks"] if iters and done["blocks"] else []
    return result_row("auto-round 0.16.1", name, m, per_block, log_path)


def render(rows: list[dict], baseline: int, argv: list[str], cap: int) -> str:
    lines = [
        "# Scale: peak memory and time of quantizing Llama-3.x-shaped models (W4G128 asym)", "",
        f"Machine: {machine()}.  ",
        "Commands: " + "; ".join(sorted({f"`{r.get('command', 'python benchmarks/scale.py ' + ' '.join(argv))}`"
                                         for r in rows})) + f"; last run {time.strftime('%Y-%m-%d %H:%M')}.  ",
        f"Random bf16 weights, written as 5 GB shards. Memory polled from /proc every 50 ms over each run's "
        f"process tree: anonymous (cannot be dropped; the targets are about this) and resident (also counts "
        f"memory-mapped weight files). Memory cap {cap / GiB:.0f} GiB anonymous. An idle interpreter with "
        f"torch and transformers imported holds {baseline / GiB:.2f} GiB anonymous.", "",
        "| shape | parameters | bf16 size | tool | mode | peak anonymous | peak resident | wall time | per block | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        n = r["blocks_timed"]
        note = {"enough": f"stopped after {n or 'the first'} block{'' if n == 1 else 's'} (as planned)",
                "memory cap": "stopped: exceeded the memory cap", "timeout": "stopped: time limit"}.get(r["stopped"] or "", "")
        if r["returncode"] not in (0, None) and not r["stopped"]:
            note = f"failed (exit {r['returncode']}); see {r['log']}"
        per_block = f"{r['seconds_per_block']:.1f} s" if r["seconds_per_block"] else ""
        lines.append(f"| {r['shape']} | {r['params'] / 1e9:.2f}B | {r['params'] * 2 / GiB:.1f} GiB | {r['tool']} | "
                     f"{r['mode']} | {r['peak_anon_gib']:.2f} GiB | {r['peak_rss_gib']:.2f} GiB | {r['seconds']:.0f} s | "
                     f"{per_block} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="1b,3b,8b", help="comma-separated among " + ",".join(SHAPES))
    p.add_argument("--signround-blocks", type=int, default=2,
                   help="stop tuning after this many blocks (0: tune every block); round-to-nearest always runs whole")
    p.add_argument("--no-autoround", dest="autoround", action="store_false")
    p.add_argument("--no-tuning", dest="tuning", action="store_false", help="round-to-nearest only")
    p.add_argument("--tune-iters", type=int, default=40,
                   help="iterations per block for both tools (default 40, the cpu-demo recipe); fewer give the same "
                        "peak memory in less time, and the report's per-block time is then for that many")
    p.add_argument("--memory-cap-gib", type=float, default=20.0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scale.md"))
    args = p.parse_args(argv)
    cap = int(args.memory_cap_gib * GiB)
    baseline = idle_baseline_bytes(sys.executable, "torch, transformers, safetensors")
    out = Path(args.out)
    shapes = args.shapes.split(",")
    # Rows of shapes and tools not run this time are kept from the last report, so they can be measured in turns.
    old = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else []
    tools = {"signround"} | ({"auto-round 0.16.1"} if args.autoround else set())
    rows = [r for r in old if r["shape"] not in {SHAPES[k]["name"] for k in shapes} or r["tool"] not in tools]
    for key in shapes:
        shape = SHAPES[key]
        model = write_random_model(key)
        work = SCALE_DIR / "runs" / shape["name"]
        work.mkdir(parents=True, exist_ok=True)
        blocks = args.signround_blocks or None
        runs = [lambda: run_signround(model, work, ["--iters", "0"], None, cap, "round-to-nearest")]
        if args.tuning:
            mode = f"SignRound cpu-demo, {args.tune_iters} iters"
            runs.append(lambda: run_signround(model, work, ["--recipe", "cpu-demo", "--iters", str(args.tune_iters)],
                                              blocks, cap, mode))
        if args.autoround:
            runs.append(lambda: run_autoround(model, work, 0, cap, "round-to-nearest", None))
            if args.tuning:
                runs.append(lambda: run_autoround(model, work, args.tune_iters, cap, mode, blocks))
        for run in runs:
            row = {"shape": shape["name"], "params": model_params(shape), **run(),
                   "command": "python benchmarks/scale.py " + " ".join(argv), "when": time.strftime("%Y-%m-%d %H:%M")}
            tag(json.dumps(row))
            rows.append(row)
            out.parent.mkdir(parents=True, exist_ok=True)
            rows.sort(key=lambda r: r["params"])
            out.write_text(render(rows, baseline, argv, cap))
            out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
