"""Quality benchmark: held-out perplexity of bf16, round-to-nearest and SignRound on one model.

    .venv/bin/python benchmarks/quality.py --recipe cpu-demo --out benchmarks/results/quality-cpu-demo.md

For each setting it quantizes the model twice (round-to-nearest in process; SignRound in a
subprocess of `signround quantize`, so its time and peak memory are its own) and measures
perplexity with transformers on the dequantized weights, on two held-out texts that the
tuner never sees: Wikipedia articles of the evaluation split (in domain) and Australian news
articles (out of domain). Prints a markdown table with the machine and the command.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from signround_vllm.checkpoint import dequantized_state_dict  # noqa: E402
from signround_vllm.format import LayerQuantSpec, SignRoundConfig  # noqa: E402
from offline_tuner.default_model import cache_root, prepare_default_model  # noqa: E402
from offline_tuner.evaluation import perplexity_of_model  # noqa: E402
from offline_tuner.quantize import load_causal_lm, quantize_checkpoint  # noqa: E402
from offline_tuner.text_data import news_text, token_windows, wikipedia_text  # noqa: E402

SETTINGS = {"W4G64asym": LayerQuantSpec(4, 64, False), "W4G64sym": LayerQuantSpec(4, 64, True),
            "W3G64asym": LayerQuantSpec(3, 64, False), "W2G32asym": LayerQuantSpec(2, 32, False)}


def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def perplexities(model, windows: dict) -> dict:
    return {name: perplexity_of_model(model, w) for name, w in windows.items()}


def load_dequantized(model, ckpt: Path):
    missing, unexpected = model.load_state_dict(dequantized_state_dict(ckpt, torch.bfloat16), strict=False)
    if unexpected or any(not k.startswith("lm_head") for k in missing):
        raise RuntimeError(f"{ckpt}: state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--recipe", default="cpu-demo")
    p.add_argument("--tune-args", default="", help="extra arguments for `signround quantize`, e.g. '--iters 100'")
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--eval-seq-len", type=int, default=1024)
    p.add_argument("--out", help="also write the markdown report to this file")
    p.add_argument("--work", default=str(cache_root() / "bench-quality"))
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    model_dir = prepare_default_model(progress=log)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = {"wiki": token_windows(tokenizer, wikipedia_text("evaluation"), args.eval_windows, args.eval_seq_len, None),
               "news": token_windows(tokenizer, news_text(), args.eval_windows, args.eval_seq_len, None)}
    model = load_causal_lm(model_dir, torch.bfloat16)
    base = perplexities(model, windows)
    log(f"bf16: {base}")
    work = Path(args.work)
    rows = []
    for name in args.settings:
        spec = SETTINGS[name]
        rtn_dir = work / f"rtn-{name}"
        quantize_checkpoint(model_dir, rtn_dir, SignRoundConfig(default=spec), overwrite=True)
        rtn = perplexities(load_dequantized(model, rtn_dir), windows)
        log(f"{name} round-to-nearest: {rtn}")
        sr_dir = work / f"signround-{name}"
        cmd = [str(Path(sys.executable).with_name("signround")), "quantize", str(model_dir), "--out", str(sr_dir),
               "--overwrite", "--bits", str(spec.bits), "--group-size", str(spec.group_size),
               "--recipe", args.recipe, *(["--sym"] if spec.sym else []), *shlex.split(args.tune_args)]
        log(" ".join(cmd))
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        run = json.loads((sr_dir / "signround_run.json").read_text())
        sr = perplexities(load_dequantized(model, sr_dir), windows)
        log(f"{name} SignRound: {sr} in {run['seconds']:.0f} s")
        rows.append((name, rtn, sr, run))

    lines = [f"Model: SmolLM2-135M-Instruct (bf16 reference). Perplexity on {args.eval_windows} x "
             f"{args.eval_seq_len} held-out tokens: `wiki` = Wikipedia evaluation split (in domain), "
             f"`news` = Lee corpus news articles (out of domain, never used for calibration).",
             f"Machine: {machine()}.",
             f"Command: `{' '.join(['python', 'benchmarks/quality.py'] + (argv if argv is not None else sys.argv[1:]))}`",
             f"SignRound settings: recipe `{args.recipe}` {args.tune_args}".rstrip() + ".", "",
             "| setting | wiki bf16 | wiki RTN | wiki SignRound | gap closed | news bf16 | news RTN | news SignRound "
             "| tuning time | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, rtn, sr, run in rows:
        gap = (rtn["wiki"] - sr["wiki"]) / (rtn["wiki"] - base["wiki"]) * 100 if rtn["wiki"] > base["wiki"] else 0.0
        lines.append(f"| {name} | {base['wiki']:.2f} | {rtn['wiki']:.2f} | {sr['wiki']:.2f} | {gap:.0f}% | "
                     f"{base['news']:.2f} | {rtn['news']:.2f} | {sr['news']:.2f} | {run['seconds']:.0f} s | "
                     f"{run['peak_rss_bytes'] / 2**30:.2f} GiB |")
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
