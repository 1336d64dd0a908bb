"""Quality benchmark: held-out perplexity of bf16, round-to-nearest, SignRound and the tools users pick instead.

    .venv/bin/python benchmarks/quality.py --out benchmarks/results/quality-cpu-demo.md
    .venv/bin/python benchmarks/quality.py --no-autoround          # without the auto-round columns
    .venv/bin/python benchmarks/quality.py --anchors autoround-ext gptq awq   # more tools side by side

For each setting the model is quantized by round-to-nearest (in process), by this project's
SignRound (`signround quantize`, a subprocess) and by each other tool (a subprocess in the tool's
own virtual environment under `.cache`, created on first use; none is a dependency of the project):
PyPI auto-round (default on), auto-round with `enable_alg_ext`, llm-compressor's GPTQ and AWQ.
Every tool gets the very same calibration windows and seed, and the tuners the same iterations and
batch size; they run one after the other, in alternating order, so slow phases of a shared machine
hit all. Perplexity is measured as vLLM serves each result (prompt log-probabilities,
`benchmarks/served_perplexity.py`: this project's checkpoints through the plugin, the other tools'
fake-quantized weights as a bf16 copy, since the plugin does not load their formats) and, as a check,
with transformers on the same weights (`--no-served`: transformers only), on three held-out texts
that no tool sees: Wikipedia articles of the evaluation split (in domain), Australian news articles
and the documentation strings of Python standard-library modules (out of domain). `mixed<bits>`
settings choose per-layer bits with `--avg-bits` (SignRound and round-to-nearest; with `--anchors autoscheme`,
auto-round's AutoScheme at the same average and candidate settings; the uniform anchors skip them). `--resume`
reuses runs an earlier call finished. Prints a markdown report with the machine and the command, and
writes it to --out.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import benchlib  # noqa: E402
from benchmarks.benchlib import machine, mean_of, run_logged, run_perplexity, write_report  # noqa: E402
from signround_vllm.checkpoint import dequantized_state_dict  # noqa: E402
from signround_vllm.format import LayerQuantSpec, SignRoundConfig, bits_per_weight  # noqa: E402
from offline_tuner.default_model import cache_root, prepare_default_model  # noqa: E402
from offline_tuner.evaluation import perplexity_of_model  # noqa: E402
from offline_tuner.quantize import load_causal_lm, quantize_checkpoint  # noqa: E402
from offline_tuner.text_data import (SELECTION_DOC_MODULES, news_text, python_docs_text, token_windows,  # noqa: E402
                                    wikipedia_text)

AUTOROUND_VENV = REPO / ".cache" / "autoround-venv"
AUTOROUND_PINS = ("auto-round==0.16.1", "transformers==5.19.0", "accelerate==1.15.0", "safetensors")
LLMCOMPRESSOR_VENV = REPO / ".cache" / "llmcompressor-venv"
LLMCOMPRESSOR_PINS = ("llmcompressor==0.14.0.1", "transformers==5.17.0")  # it asks for transformers <= 5.17


class Anchor(NamedTuple):
    """A tool other than SignRound, run by a driver script in its own venv."""
    label: str
    venv: Path
    pins: tuple[str, ...]
    driver: str  # in benchmarks/
    args: tuple[str, ...]  # given to the driver besides the shared ones
    tunes: bool  # takes --iters and --batch-size (a tuner, not a one-shot method)
    mixed: bool = False  # runs the mixed<bits> settings (chooses per-layer settings), not the uniform ones


ANCHORS = {
    "autoround": Anchor("auto-round", AUTOROUND_VENV, AUTOROUND_PINS, "autoround_driver.py", (), True),
    "autoround-ext": Anchor("auto-round alg-ext", AUTOROUND_VENV, AUTOROUND_PINS, "autoround_driver.py",
                            ("--alg-ext",), True),
    "autoscheme": Anchor("auto-round AutoScheme", AUTOROUND_VENV, AUTOROUND_PINS, "autoround_driver.py", (), True,
                         mixed=True),
    "gptq": Anchor("GPTQ", LLMCOMPRESSOR_VENV, LLMCOMPRESSOR_PINS, "llmcompressor_driver.py",
                   ("--algorithm", "gptq"), False),
    "awq": Anchor("AWQ", LLMCOMPRESSOR_VENV, LLMCOMPRESSOR_PINS, "llmcompressor_driver.py",
                  ("--algorithm", "awq"), False),
}
SETTINGS = {"W4G64asym": LayerQuantSpec(4, 64, False), "W4G64sym": LayerQuantSpec(4, 64, True),
            "W3G64asym": LayerQuantSpec(3, 64, False), "W3G32sym": LayerQuantSpec(3, 32, True),
            "W2G32asym": LayerQuantSpec(2, 32, False), "W2G64asym": LayerQuantSpec(2, 64, False)}
# Mixed bits (`--avg-bits`): "mixed3.5" = 3.5 stored bits per weight, the tuner's default choices (2/3/4/8 bits x
# groups 32/64/128, asymmetric and symmetric; AutoScheme gets the very same candidates).
# Uniform settings of the same cost, for comparison: W3G32sym = 3.5, W2G32asym = 2.75.
MIXED_PREFIX = "mixed"


def setting(name: str):
    """A uniform LayerQuantSpec, or for "mixed<bits>" an Allocation."""
    if name.startswith(MIXED_PREFIX):
        from offline_tuner.allocation import Allocation

        try:
            return Allocation(float(name[len(MIXED_PREFIX):]))
        except ValueError:
            raise SystemExit(f"--settings {name}: write mixed<average bits>, e.g. mixed3.5") from None
    if name not in SETTINGS:
        raise SystemExit(f"--settings {name}: choose among {list(SETTINGS)} or mixed<average bits>")
    return SETTINGS[name]


def stored_bits(layers, sym: bool) -> float:
    """Average stored bits per weight (scales and zero points included) of [bits, group size, weights] or
    [bits, group size, weights, symmetric] layers (`sym` for those without a kind of their own)."""
    layers = [(*layer, sym)[:4] for layer in layers]
    total = sum(n for _, _, n, _ in layers)
    return sum(n * bits_per_weight(LayerQuantSpec(b, g, s), g) for b, g, n, s in layers) / total


def log(msg: str) -> None:
    benchlib.log("quality", msg)


def anchor_command(key: str, python: Path, model_dir: Path, out_dir: Path, calib_file: Path, target: list[str],
                   iters: int, batch: int, seed: int, sym: bool) -> list[str]:
    """The command that runs anchor `key` through its driver with its venv's `python`. target: the setting's
    driver arguments (--bits/--group-size, or --avg-bits/--options for the mixed settings)."""
    anchor = ANCHORS[key]
    tuning = ["--iters", str(iters), "--batch-size", str(batch)] if anchor.tunes else []
    return [str(python), str(REPO / "benchmarks" / anchor.driver), str(model_dir), *anchor.args, "--out", str(out_dir),
            "--calibration", str(calib_file), *target, *tuning, "--seed", str(seed), *(["--sym"] if sym else [])]


def perplexities(model, windows: dict) -> dict:
    return {name: perplexity_of_model(model, w) for name, w in windows.items()}


def restore_base(model):
    """Put the model's own bf16 tensors back (a tool may have changed more than the linear weights)."""
    model.load_state_dict(model.base_state, strict=True)
    return model


def load_dequantized(model, ckpt: Path):
    restore_base(model)
    missing, unexpected = model.load_state_dict(dequantized_state_dict(ckpt, torch.bfloat16), strict=False)
    if unexpected or any(not k.startswith("lm_head") for k in missing):
        raise RuntimeError(f"{ckpt}: state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def unused_windows(ids: list[int], calib, seeds, n: int, length: int) -> torch.Tensor:
    """[n, length] tokens of the token stream `ids`, from its end, sharing no token with the calibration
    windows drawn from it for any of `seeds` (drawn as offline_tuner.text_data.token_windows draws them)."""
    used = torch.zeros(len(ids), dtype=torch.bool)
    available = len(ids) // calib.seq_len
    for seed in seeds:
        for pick in torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:calib.n_samples]:
            used[int(pick) * calib.seq_len:(int(pick) + 1) * calib.seq_len] = True
    spans, stop = [], len(ids)
    while len(spans) < n and stop >= length:
        start = stop - length
        if used[start:stop].any():
            stop = int(torch.nonzero(used[start:stop])[0]) + start  # restart below the first used token
            continue
        spans.append(ids[start:stop])
        stop = start
    if len(spans) < n:
        raise RuntimeError(f"the calibration split has too few unused {length}-token spans for {n} selection windows")
    return torch.tensor(spans, dtype=torch.long)


def serve(models: dict, windows_file: Path, windows_id: str, work: Path, tag: str, timeout: float,
          resume: bool, remade: set = frozenset()) -> dict:
    """{key: {"method", "perplexity"}} for {key: model folder}, as vLLM serves them (one subprocess).
    With `resume`, the results of an earlier call for the same folders on the same windows (`windows_id`,
    their `windows_digest`) are reused, except for the folders in `remade` (written again by this call)."""
    out = work / f"served-{tag}-{windows_id}.json"
    earlier = (benchlib.read_json(out) or {}) if resume else {}
    redone = {str(folder) for folder in remade}
    earlier = {folder: result for folder, result in earlier.items() if folder not in redone}
    todo = [folder for folder in models.values() if str(folder) not in earlier]
    if not todo:
        log(f"reusing the served perplexities in {out} (--resume)")
    else:
        fresh_file = work / f"served-{tag}-{windows_id}.new.json"
        cmd = [sys.executable, str(REPO / "benchmarks" / "served_perplexity.py"), "--windows", str(windows_file),
               "--out", str(fresh_file), "--models", *map(str, todo)]
        log(f"serving {len(todo)} models with vLLM for perplexity ({tag})"
            + (f"; {len(models) - len(todo)} reused (--resume)" if len(todo) < len(models) else ""))
        run_logged(cmd, work / "logs" / f"served-{tag}.log", timeout=timeout)
        earlier.update(json.loads(fresh_file.read_text()))
        out.write_text(json.dumps(earlier, indent=1))
        fresh_file.unlink()
    return {key: earlier[str(folder)] for key, folder in models.items()}


# What a SignRound checkpoint depends on: the tuner and the stored format (not the serving kernels).
TUNER_SOURCES = ("offline_tuner", "signround_vllm/format.py", "signround_vllm/checkpoint.py",
                 "signround_vllm/shards.py")


def tuner_digest() -> str:
    """A fingerprint of the tuner's source, so --resume never reuses a SignRound run that other code made
    (a changed default leaves the command line as it was)."""
    digest = hashlib.sha256()
    for entry in TUNER_SOURCES:
        path = REPO / entry
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(str(f.relative_to(REPO)).encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()[:12]


def weights_digest(folder: Path) -> str | None:
    """A fingerprint of a checkpoint's tensors (None where there is none yet)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()


def windows_digest(windows: dict) -> str:
    """A short fingerprint of the evaluation windows (names and tokens), so results on other windows are not reused."""
    digest = hashlib.sha256()
    for name, tokens in windows.items():
        digest.update(name.encode())
        digest.update(tokens.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()[:12]


def save_bf16_copy(model, folder: Path) -> Path:
    """The model as it is in memory (e.g. with another tool's fake-quantized weights), saved as a plain bf16
    folder that vLLM serves without a quantization method."""
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def ensure_venv(venv: Path, pins: tuple[str, ...]) -> Path:
    """A tool in its own venv, with this project's torch build so every tool runs the same kernels."""
    python = venv / "bin" / "python"
    stamp = venv / ".pins"
    pins = (f"torch=={torch.__version__}", *pins)
    if python.exists() and stamp.exists() and stamp.read_text() == " ".join(pins):
        return python
    log(f"creating {venv} with {' '.join(pins)} (a minute or two)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *pins], check=True, stdout=sys.stderr)
    stamp.write_text(" ".join(pins))
    return python


def ensure_autoround_venv() -> Path:  # also used by benchmarks/scale.py
    return ensure_venv(AUTOROUND_VENV, AUTOROUND_PINS)


def load_fake_quantized(model, weights_file: Path):
    """Load another tool's fake-quantized weights: every linear weight but lm_head's, and optionally other
    tensors it changed (AWQ rescales norms); nothing the model does not have."""
    from safetensors.torch import load_file

    weights = load_file(str(weights_file))
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    known = set(model.state_dict())
    if not linears <= set(weights) or not set(weights) <= known:
        raise RuntimeError(f"{weights_file}: weights differ from the model's: missing linear weights "
                           f"{sorted(linears - set(weights))[:3]}, unknown {sorted(set(weights) - known)[:3]}")
    restore_base(model)
    model.load_state_dict(weights, strict=False)
    return model


def main(argv=None) -> int:
    from offline_tuner.quantize import RECIPES, Calibration, calibration_windows

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=["W4G64asym", "W4G64sym", "W3G64asym", "W2G32asym"],
                   help=f"among {list(SETTINGS)}, or mixed<average bits> (e.g. mixed3.5: per-layer bits chosen by "
                        f"--avg-bits; auto-round is not run for those)")
    p.add_argument("--recipe", default="cpu-demo", choices=list(RECIPES))
    p.add_argument("--iters", type=int, help="override the recipe's iterations per block (both tools)")
    p.add_argument("--n-samples", type=int, help="override the recipe's calibration windows (both tools)")
    p.add_argument("--seq-len", type=int, help="override the recipe's tokens per window (both tools)")
    p.add_argument("--batch-size", type=int, help="override the recipe's batch size (both tools)")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43],
                   help="one run per seed (calibration windows and batches); means are reported too")
    p.add_argument("--autoround", action=argparse.BooleanOptionalAction, default=True,
                   help="also run PyPI auto-round side by side (default on)")
    p.add_argument("--anchors", nargs="*", default=[], choices=[k for k in ANCHORS if k != "autoround"],
                   help="more tools side by side, each in its own venv under .cache: autoround-ext = auto-round with "
                        "its SignRoundV2 extensions (enable_alg_ext); gptq, awq = llm-compressor's GPTQModifier and "
                        "AWQModifier (+ QuantizationModifier) at the same bits and group size, same windows; "
                        "autoscheme = auto-round's AutoScheme, on the mixed<bits> settings only")
    p.add_argument("--stream-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="storage of SignRound's activation streams between blocks (default float32)")
    p.add_argument("--signround-args", default="",
                   help="extra arguments for `signround quantize`, for ablations (write --signround-args=\"--clip-search\"); the "
                        "round-to-nearest column stays plain")
    p.add_argument("--texts", choices=["evaluation", "selection"], default="evaluation",
                   help="evaluation (default): wiki, news, docs as below; selection: the texts on which tuning "
                        "defaults are chosen, never the evaluation texts: wiki-sel (Wikipedia calibration-split "
                        "windows that share no token with the calibration windows of the seeds run) and docs-sel "
                        "(documentation strings of other standard-library modules)")
    p.add_argument("--served", action=argparse.BooleanOptionalAction, default=True,
                   help="perplexity as vLLM serves each result (default on; --no-served: transformers only)")
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--eval-seq-len", type=int, default=1024)
    p.add_argument("--timeout", type=float, default=7200, help="seconds allowed to each tool run")
    p.add_argument("--resume", action="store_true",
                   help="reuse tool runs and served perplexities that an earlier call with the same --work finished "
                        "with the very same command and, for SignRound, the very same tuner source (a stopped "
                        "run can be taken up again)")
    p.add_argument("--out", help="also write the markdown report to this .md file (and its numbers beside it, .json)")
    p.add_argument("--work", default=str(cache_root() / "bench-quality"))
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    tune, calib = RECIPES[args.recipe]
    iters = args.iters if args.iters is not None else tune.iters
    batch = args.batch_size or tune.batch_size
    calib = Calibration(args.n_samples or calib.n_samples, args.seq_len or calib.seq_len)
    t_start, loads = time.perf_counter(), benchlib.LoadWatch()
    model_dir = prepare_default_model(progress=log)
    anchors = (["autoround"] if args.autoround else []) + args.anchors
    anchor_python = {key: ensure_venv(ANCHORS[key].venv, ANCHORS[key].pins) for key in anchors}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if args.texts == "evaluation":
        windows = {"wiki": token_windows(tokenizer, wikipedia_text("evaluation"), args.eval_windows, args.eval_seq_len, None),
                   "news": token_windows(tokenizer, news_text(), args.eval_windows, args.eval_seq_len, None),
                   "docs": token_windows(tokenizer, python_docs_text(), args.eval_windows, args.eval_seq_len, None)}
    else:
        calibration_ids = tokenizer(wikipedia_text("calibration"), add_special_tokens=False,
                                    return_attention_mask=False)["input_ids"]
        windows = {"wiki-sel": unused_windows(calibration_ids, calib, args.seeds, args.eval_windows, args.eval_seq_len),
                   "docs-sel": token_windows(tokenizer, python_docs_text(SELECTION_DOC_MODULES), args.eval_windows,
                                             args.eval_seq_len, None)}
    windows_file, windows_id = work / "eval-windows.pt", windows_digest(windows)
    torch.save(windows, windows_file)
    model = load_causal_lm(model_dir, torch.bfloat16)
    model.base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base = perplexities(model, windows)
    log(f"bf16: {base}")
    served_base = (serve({"bf16": model_dir}, windows_file, windows_id, work, "bf16", args.timeout,
                         args.resume)["bf16"]
                   if args.served else None)
    rows, turn = [], 0
    sr_code = tuner_digest()  # the tuner this call runs, read once
    for name in args.settings:
        spec = setting(name)
        mixed = not isinstance(spec, LayerQuantSpec)
        anchor_sym = not mixed and spec.sym  # mixed: each AutoScheme option names its own kind
        rtn_dir = work / f"rtn-{name}"
        rtn_before = weights_digest(rtn_dir)
        if mixed:  # round-to-nearest with the same allocation (its sensitivity pass draws from the seed 42)
            quantize_checkpoint(model_dir, rtn_dir, SignRoundConfig(), overwrite=True, allocation=spec)
            quant_args = ["--avg-bits", str(spec.avg_bits)]
        else:
            quantize_checkpoint(model_dir, rtn_dir, SignRoundConfig(default=spec), overwrite=True)
            quant_args = ["--bits", str(spec.bits), "--group-size", str(spec.group_size),
                          *(["--sym"] if spec.sym else [])]
        rtn = perplexities(load_dequantized(model, rtn_dir), windows)
        log(f"{name} round-to-nearest: {rtn}")
        to_serve, setting_rows, remade = {("rtn", None): rtn_dir}, [], set()  # remade: tool runs redone here
        if weights_digest(rtn_dir) != rtn_before:  # rewritten every call; served again only where it changed
            remade.add(rtn_dir)
        for seed in args.seeds:
            row = {"name": name, "seed": seed, "rtn": rtn}
            calib_file = work / f"calibration-seed{seed}.pt"
            torch.save(calibration_windows(model_dir, calib, seed), calib_file)
            tag = f"{name}-seed{seed}"
            sr_dir = work / f"signround-{tag}"
            # key -> (label, command, run log written by the tool, its weights into the model)
            tools = {"sr": ("SignRound", [
                str(Path(sys.executable).with_name("signround")), "quantize", str(model_dir), "--out", str(sr_dir),
                "--overwrite", *quant_args,
                "--recipe", args.recipe, "--iters", str(iters), "--batch-size", str(batch),
                "--n-samples", str(calib.n_samples), "--seq-len", str(calib.seq_len), "--seed", str(seed),
                "--stream-dtype", args.stream_dtype, *args.signround_args.split()],
                sr_dir / "signround_run.json", lambda: load_dequantized(model, sr_dir))}
            for key in [k for k in anchors if ANCHORS[k].mixed == mixed]:
                out_dir = work / f"{key}-{tag}"
                target = (["--avg-bits", str(spec.avg_bits), "--options", ",".join(
                           f"{c.bits}:{c.group_size}:{'sym' if c.sym else 'asym'}" for c in spec.candidates())]
                          if mixed
                          else ["--bits", str(spec.bits), "--group-size", str(spec.group_size)])
                tools[key] = (ANCHORS[key].label,
                    anchor_command(key, anchor_python[key], model_dir, out_dir, calib_file, target, iters, batch, seed,
                                   anchor_sym),
                    out_dir / "run.json",
                    lambda out_dir=out_dir: load_fake_quantized(model, out_dir / "weights.safetensors"))
            for key in (list(tools) if turn % 2 == 0 else list(tools)[::-1]):  # alternate who goes first
                label, cmd, run_file, load_weights = tools[key]
                record_file = run_file.parent / "bench-record.json"
                record = benchlib.read_json(record_file) if args.resume else None
                code = sr_code if key == "sr" else None  # the anchors' code is pinned by their venvs
                if (record is not None and record["cmd"] == cmd and record.get("code") == code
                        and run_file.is_file()):
                    wall = record["wall"]
                    log(f"{tag} {label}: reusing the finished run in {run_file.parent} (--resume)")
                else:
                    log(" ".join(cmd))
                    loads.sample()
                    remade.add(run_file.parent if key == "sr" else run_file.parent / "served-bf16")
                    wall = run_logged(cmd, work / "logs" / f"{run_file.parent.name}.log", timeout=args.timeout)
                    record_file.write_text(json.dumps({"cmd": cmd, "wall": wall, "code": code}))
                run = json.loads(run_file.read_text())
                row[key] = perplexities(load_weights(), windows)
                if args.served:
                    to_serve[(key, seed)] = (run_file.parent if key == "sr"
                                             else save_bf16_copy(model, run_file.parent / "served-bf16"))
                if key == "sr":
                    row["bits_per_weight"] = (run["allocation"]["achieved_bits"] if mixed
                                              else bits_per_weight(spec, spec.group_size))
                elif "layer_settings" in run:  # the tool's own choice of settings, costed as this format stores it
                    row[f"{key}_bits"] = stored_bits(run["layer_settings"].values(), anchor_sym)
                row[f"{key}_run"] = {"seconds": run["seconds"], "wall": wall, "peak_rss_bytes": run["peak_rss_bytes"],
                                     "tool": run.get("tool", label)}
                log(f"{tag} {label}: {row[key]}, {run['seconds']:.0f} s (process {wall:.0f} s)")
            turn += 1
            setting_rows.append(row)
        if args.served:
            served = serve({f"{k}-{s}": folder for (k, s), folder in to_serve.items()}, windows_file, windows_id,
                           work, name, args.timeout, args.resume, remade)
            for row in setting_rows:
                row["served"] = {k: served[f"{k}-{s}"] for (k, s) in to_serve if s in (None, row["seed"])}
                log(f"{name}-seed{row['seed']} served: "
                    + ", ".join(f"{k} {v['perplexity']}" for k, v in row["served"].items()))
        rows += setting_rows
    loads.sample()
    report = render(args, argv, base, served_base, rows, calib, iters, batch, loads, time.perf_counter() - t_start)
    print(report)
    if args.out:
        out = Path(args.out)
        payload = {"machine": benchlib.machine_info(("torch", "transformers")), "bf16": base,
                   "bf16_served": served_base, "runs": rows,
                   "iters": iters, "batch_size": batch, "calibration": [calib.n_samples, calib.seq_len]}
        write_report(out.parent, out.stem, report, payload)  # <out>.md and the numbers in <out>.json
    return 0


def render(args, argv, base, served_base, rows, calib, iters, batch, loads, seconds) -> str:
    anchors = [k for k in ANCHORS if any(k in r for r in rows)]
    labels = {"sr": "SignRound", **{k: ANCHORS[k].label for k in anchors}}
    tools = {k: next(r[f"{k}_run"]["tool"] for r in rows if f"{k}_run" in r) for k in anchors}
    command = " ".join(["python", "benchmarks/quality.py"] + (argv if argv is not None else sys.argv[1:]))
    fmt = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
    served = served_base is not None
    how = ("served by vLLM (prompt log-probabilities of the served model; SignRound and round-to-nearest checkpoints "
           "through the plugin, the other tools' fake-quantized weights saved as a bf16 copy, as the plugin does not "
           "load their formats)" if served else "with transformers (bf16) on the dequantized weights")
    lines = [
        "# Quality: SmolLM2-135M-Instruct, round-to-nearest vs SignRound"
        + "".join(f" vs {tools[k]}" for k in anchors),
        "",
        f"Machine: {machine(('torch', 'transformers'))}; {loads.describe()} "
        f"(above 2 means other jobs shared the 2 cores). Date: {time.strftime('%Y-%m-%d %H:%M')}; "
        f"wall time {seconds / 60:.0f} min.",
        f"Command: `{command}`",
        f"Tuning: {iters} iterations per block, {calib.n_samples} x {calib.seq_len} calibration tokens "
        f"(the same windows of the built-in Wikipedia calibration split for every tool, drawn with the seed), "
        f"batch {batch} (SignRound and auto-round; GPTQ and AWQ take no iterations), seeds "
        f"{', '.join(map(str, args.seeds))}; lm_head stays bf16.",
        f"Perplexity on {args.eval_windows} x {args.eval_seq_len} held-out tokens {how}: " + (
            "`wiki` = Wikipedia evaluation split (in domain), `news` = Lee corpus news articles and `docs` = "
            "documentation strings of Python standard-library modules (both out of domain)." if args.texts == "evaluation"
            else "selection texts, for choosing defaults (never the evaluation texts): `wiki-sel` = windows of the "
            "Wikipedia calibration split that share no token with the calibration windows of these seeds (in domain), "
            "`docs-sel` = documentation strings of other standard-library modules than the evaluation's (out of "
            "domain)."), "",
        "## Mean over seeds", "",
        "| setting | bits/weight | text | bf16 | RTN | " + " | ".join(labels.values())
        + " | RTN-to-bf16 gap closed by SignRound |" + "".join(f" SignRound vs {labels[k]} |" for k in anchors),
        "|---|---|---|---|---|" + "---|" * len(labels) + "---|" + "---|" * len(anchors)]
    names = list(dict.fromkeys(r["name"] for r in rows))
    for name in names:
        group = [r for r in rows if r["name"] == name]
        for text in base:
            b = served_base["perplexity"][text] if served else base[text]
            rtn = run_perplexity(group[0], "rtn", text, served)
            means = {k: mean_of([run_perplexity(r, k, text, served) for r in group]) for k in labels}
            sr = means["sr"]
            closed = f"{(rtn - sr) / (rtn - b) * 100:.0f}%" if sr is not None and rtn > b else "-"
            versus = [f"{(sr / means[k] - 1) * 100:+.1f}%" if sr is not None and means[k] is not None else "-"
                      for k in anchors]
            bpw = mean_of([r.get("bits_per_weight") for r in group])
            lines.append(f"| {name} | {fmt(bpw) if bpw is None else f'{bpw:.3f}'} | {text} | {b:.2f} | {fmt(rtn)} | "
                         + " | ".join(fmt(v) for v in means.values()) + f" | {closed} |"
                         + "".join(f" {v} |" for v in versus))
    if served:  # the served figures against transformers on the same weights
        pairs = [(served_base["perplexity"][t], base[t]) for t in base]
        pairs += [(run_perplexity(r, k, t, True), run_perplexity(r, k, t, False))
                  for r in rows for k in ("rtn", *labels) for t in base]
        worst = max(abs(s / t - 1) for s, t in pairs if s is not None and t is not None)
        lines += ["", f"Check: served perplexities differ from transformers' on the same bf16 weights by at most "
                      f"{worst * 100:.2f}% over all {sum(s is not None for s, _ in pairs)} figures."]
    texts = list(base)
    lines += ["", "## Each run", "",
              "bits/weight: stored bits per weight of the tool's choice of per-layer settings, scales and zero points "
              "included (costed as this project stores them).", "",
              "| setting | seed | tool | bits/weight | " + " | ".join(texts) + " |",
              "|---|---|---|---|" + "---|" * len(texts)]
    for r in rows:
        for k, label in labels.items():
            if k in r:
                bits = r.get("bits_per_weight") if k == "sr" else r.get(f"{k}_bits", r.get("bits_per_weight"))
                lines.append(f"| {r['name']} | {r['seed']} | {label} | {fmt(bits) if bits is None else f'{bits:.3f}'} | "
                             + " | ".join(fmt(run_perplexity(r, k, t, served)) for t in texts) + " |")
    lines += ["", "## Tuning cost", "",
              "Tool time: SignRound's own figure covers model load, calibration, tuning and packing; the other tools' "
              "cover calibration and quantization (their model is loaded before the clock starts). Process: wall time "
              "of the whole subprocess, Python start and imports included. Peak RSS of the process. Means over seeds; "
              "ratios are to SignRound's figure in the same runs.", "",
              "| setting | tool | tool time | ratio to SignRound | process | ratio to SignRound | peak RSS |",
              "|---|---|---|---|---|---|---|"]
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b is not None else "-"  # noqa: E731
    secs = lambda x: f"{x:.0f} s" if x is not None else "-"  # noqa: E731
    ratio = lambda x, y: f"{x / y:.2f}" if x is not None and y else "-"  # noqa: E731
    for name in names:
        group = [r for r in rows if r["name"] == name]
        cost = {k: {m: mean_of([r.get(f"{k}_run", {}).get(m) for r in group])
                    for m in ("seconds", "wall", "peak_rss_bytes")} for k in labels}
        for k, label in labels.items():
            c, sr = cost[k], cost["sr"]
            if c["seconds"] is None:
                continue
            lines.append(f"| {name} | {label} | {secs(c['seconds'])} | {ratio(c['seconds'], sr['seconds'])} | "
                         f"{secs(c['wall'])} | {ratio(c['wall'], sr['wall'])} | {gib(c['peak_rss_bytes'])} |")
    return "\n".join(lines)

if __name__ == "__main__":
    sys.exit(main())
