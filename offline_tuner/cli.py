"""`signround` command line: the only place that prints or reads the command line."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from signround_vllm.format import (
    SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, LayerQuantSpec, SignRoundConfig, SignRoundFormatError,
)


def log(msg: str) -> None:
    print(f"[signround {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def resolve_model(arg: str) -> Path:
    """`default` (or an empty value) means the embedded SmolLM2-135M-Instruct, prepared on first use;
    otherwise a folder, or a hub id already in the local Hugging Face cache."""
    if arg in ("", "default"):
        from offline_tuner.default_model import prepare_default_model

        return prepare_default_model(progress=log)
    from offline_tuner.model_source import resolve_model_path

    return resolve_model_path(arg)


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """`5GB`, `500MB`, `2GiB` or a byte count -> bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _SIZE_UNITS or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 5GB, 500MB, 2GiB or a number of bytes")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def parse_override(text: str) -> tuple[str, dict]:
    """`NAME:bits=8,group_size=128,sym=true` -> (NAME, {...})."""
    name, sep, settings = text.partition(":")
    if not sep or not name or not settings:
        raise SignRoundFormatError(f"--layer-override {text!r}: expected MODULE:key=value[,key=value], "
                                   f"e.g. model.layers.0.mlp.down_proj:bits=8")
    out = {}
    for item in settings.split(","):
        key, _, value = item.partition("=")
        if key in ("bits", "group_size"):
            try:
                out[key] = int(value)
            except ValueError:
                raise SignRoundFormatError(f"--layer-override {text!r}: {key}={value!r} is not an integer") from None
        elif key == "sym":
            if value.lower() not in ("true", "false", "1", "0"):
                raise SignRoundFormatError(f"--layer-override {text!r}: sym={value!r}; use true or false")
            out[key] = value.lower() in ("true", "1")
        else:
            raise SignRoundFormatError(f"--layer-override {text!r}: unknown key {key!r}; accepted: bits, group_size, sym")
    return name, out


def config_from_args(args) -> SignRoundConfig:
    default = LayerQuantSpec(args.bits, args.group_size, args.sym)
    overrides = {}
    for text in args.layer_override or []:
        name, settings = parse_override(text)
        overrides[name] = LayerQuantSpec(**{"bits": default.bits, "group_size": default.group_size,
                                            "sym": default.sym, **settings})
    return SignRoundConfig(default=default, modules_to_not_convert=tuple(args.keep_unquantized),
                           layer_overrides=overrides)


def add_quant_args(p: argparse.ArgumentParser, bits=4, group_size=128) -> None:
    p.add_argument("--bits", type=int, default=bits, choices=SUPPORTED_BITS, help="weight bits (default %(default)s)")
    p.add_argument("--group-size", type=int, default=group_size, choices=SUPPORTED_GROUP_SIZES,
                   help="weights per scale along the input dim; -1 = per output channel (default %(default)s)")
    p.add_argument("--sym", action="store_true", help="symmetric (no zero points); default asymmetric")
    p.add_argument("--recipe", default="default", choices=["default", "light", "best", "cpu-demo"],
                   help="tuning preset: default = 200 iters, 128 x 2048 tokens, batch 8; light = 50 iters; "
                        "best = 1000 iters, 512 samples; cpu-demo = 40 iters, 32 x 256 tokens, batch 4. "
                        "Flags below override single fields")
    p.add_argument("--iters", type=int, help="SignRound iterations per block; 0 = round-to-nearest")
    p.add_argument("--n-samples", type=int, help="calibration windows")
    p.add_argument("--seq-len", type=int, help="tokens per calibration window")
    p.add_argument("--batch-size", type=int, help="windows per tuning step")
    p.add_argument("--lr", type=float, help="rounding-offset step size (default 1/iters, decayed linearly to 0; half that for layers of at most 3 bits that start from the clipping search)")
    p.add_argument("--minmax-lr", type=float, help="clipping-factor step size (default as --lr)")
    p.add_argument("--tune-minmax", action=argparse.BooleanOptionalAction, default=True,
                   help="also tune the min/max clipping factors (default on)")
    p.add_argument("--clip-search", action=argparse.BooleanOptionalAction, default=None,
                   help="start the min/max clipping factors from a per-group grid search (importance: each input "
                        "channel's mean squared activation) instead of 1.0, for every layer; with --iters 0, "
                        "clipping by the search alone (default: searched for asymmetric layers of 2 or 4 bits and "
                        "symmetric layers of 2 to 4 bits when tuning, so --iters 0 stays round-to-nearest; "
                        "--no-clip-search: never)")
    p.add_argument("--loss", choices=["mse", "token-normalized"],
                   help="tuning objective: each token's error relative to its own size (token-normalized, "
                        "default), so a few huge activations do not dominate, or mse over all values")
    p.add_argument("--holdout", type=int, metavar="N",
                   help="calibration windows held back from tuning; a block keeps its tuned weights only if they "
                        "beat round-to-nearest on them (default 0: judged on a batch of the tuning windows)")
    p.add_argument("--compile", choices=["auto", "on", "off"],
                   help="torch.compile of the tuning step: the same computation (sums may round in another order), "
                        "~25%% less time per step on a CPU, 5-25 s to compile once per run (default auto: on where "
                        "the run is long enough to pay)")
    p.add_argument("--bf16-autocast", action=argparse.BooleanOptionalAction, default=True,
                   help="run the block's matmuls in bf16 while tuning, on CUDA or a CPU with native bf16 "
                        "(default on; tunables and loss stay fp32)")
    p.add_argument("--stream-dtype", choices=["float32", "bfloat16"],
                   help="storage of the two activation streams between blocks (default float32; blocks compute "
                        "in float32 either way)")
    p.add_argument("--seed", type=int, default=42, help="seed for calibration sampling and batches (default 42)")
    p.add_argument("--calibration", metavar="FILE", help="calibration text: a .txt file, or .jsonl with a "
                   "\"text\" field per line (default: built-in Wikipedia calibration split)")
    p.add_argument("--keep-unquantized", nargs="*", default=["lm_head"], metavar="MODULE",
                   help="modules left in full precision (default: lm_head). Given alone, nothing is kept: lm_head is "
                        "quantized too, rounded to nearest (it lies outside the tuned blocks; a tied one is stored "
                        "apart from the input embedding, which stays full precision); "
                        "--layer-override lm_head:bits=8 gives it its own settings")
    p.add_argument("--layer-override", action="append", metavar="MODULE:key=value,...",
                   help="per-layer settings, e.g. model.layers.0.mlp.down_proj:bits=8 (repeatable)")


def cmd_model_prepare(args) -> int:
    from offline_tuner.default_model import prepare_default_model

    t0 = time.perf_counter()
    path = prepare_default_model(Path(args.out) if args.out else None, progress=log)
    log(f"default model ready at {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_model_tiny(args) -> int:
    from offline_tuner.default_model import make_tiny_model, prepare_default_model

    path = make_tiny_model(Path(args.out), seed=args.seed, num_layers=args.layers, family=args.family,
                           tokenizer_from=prepare_default_model(progress=log))
    log(f"random tiny {args.family} model (SmolLM2's tokenizer) written to {path}; its outputs are noise, "
        f"for trying the tools end to end")
    return 0


def tuning_from_args(args):
    """(TuneSettings, Calibration) from --recipe plus any single-field flags."""
    import dataclasses

    from offline_tuner.quantize import RECIPES

    tune, calib = RECIPES[args.recipe]
    tune = dataclasses.replace(tune, **{k: v for k, v in {
        "iters": args.iters, "batch_size": args.batch_size, "lr": args.lr, "minmax_lr": args.minmax_lr,
        "tune_minmax": args.tune_minmax, "bf16_autocast": args.bf16_autocast, "seed": args.seed,
        "clip_search": {True: "on", False: "off", None: None}[args.clip_search],
        "holdout": args.holdout, "compile": args.compile,
        "loss": args.loss.replace("-", "_") if args.loss else None,
        "stream_dtype": args.stream_dtype}.items()
        if v is not None})
    calib = dataclasses.replace(calib, **{k: v for k, v in {
        "n_samples": args.n_samples, "seq_len": args.seq_len, "text_file": args.calibration}.items()
        if v is not None})
    return tune, calib


class ProgressDisplay:
    """Shows the tuner's events: a tqdm bar per block on a terminal, a few plain log lines otherwise."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.bar = None
        self.t0 = time.perf_counter()

    def __call__(self, event) -> None:
        if event.kind != "iteration":
            if event.kind == "block_done" and self.bar is not None:
                self.bar.close()
                self.bar = None
            return
        d = event.data
        done, iters = d["iteration"] + 1, d["iters"]
        if self.tty:
            from tqdm import tqdm

            if self.bar is None:
                self.bar = tqdm(total=iters, desc=f"block {d['block'] + 1}/{d['n_blocks']}", unit="it",
                                leave=False, dynamic_ncols=True)
            self.bar.set_postfix_str(f"loss {d['loss']:.3e}", refresh=False)
            self.bar.update(1)
        elif done in (1, iters) or done % max(1, iters // 4) == 0:
            log(f"  block {d['block'] + 1}/{d['n_blocks']} iteration {done}/{iters} loss {d['loss']:.3e} "
                f"({time.perf_counter() - self.t0:.0f} s elapsed)")


def event_sinks(args):
    """The CLI's event sinks: the progress display, and the --log-json file if asked for."""
    from offline_tuner.events import JsonLinesLog, fan_out

    json_log = JsonLinesLog(args.log_json) if getattr(args, "log_json", None) else None
    return fan_out(ProgressDisplay(), json_log), json_log


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 2,3,4,8") from None


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def allocation_from_args(args):
    from offline_tuner.allocation import Allocation
    from offline_tuner.errors import TunerInputError

    if getattr(args, "avg_bits", None) is None:
        return None
    if args.sym and args.kind_choices is not None:
        raise TunerInputError("--sym with --avg-bits means symmetric choices only; leave it out when giving "
                              "--kind-choices")
    kinds = ("sym",) if args.sym else Allocation.kind_choices if args.kind_choices is None else args.kind_choices
    return Allocation(args.avg_bits, tuple(args.bit_choices), tuple(args.group_choices), tuple(kinds))


def cmd_quantize(args) -> int:
    from offline_tuner.quantize import quantize_checkpoint
    from offline_tuner.signround import AUTO_CLIP_SEARCH_BITS, AUTO_SYM_CLIP_SEARCH_BITS

    config = config_from_args(args)
    allocation = allocation_from_args(args)
    tune, calib = tuning_from_args(args)
    model = resolve_model(args.model)
    method = "round-to-nearest" if tune.iters == 0 else f"SignRound, {tune.iters} iterations per block"
    searched = sorted({s.short_name() for s in (config.default, *config.layer_overrides.values())
                       if tune.searches_clipping(s)})
    if tune.clip_search == "on":
        method += ", clipping searched first"
    elif allocation and tune.iters:
        method += (f", clipping searched first for layers of {' or '.join(map(str, AUTO_CLIP_SEARCH_BITS))} bits "
                   f"(symmetric: {' or '.join(map(str, AUTO_SYM_CLIP_SEARCH_BITS))})")
    elif searched:
        method += f", clipping of the {', '.join(searched)} layers searched first"
    what = f"mixed bits to {allocation.avg_bits} per weight" if allocation else config.default.short_name()
    log(f"quantizing {model} -> {args.out} ({what}, {method})")
    events, json_log = event_sinks(args)
    try:
        result = quantize_checkpoint(model, args.out, config, tune=tune, calibration=calib,
                                     overwrite=args.overwrite, resume=args.resume, progress=log, events=events,
                                     max_shard_bytes=args.max_shard_size, device=args.device,
                                     stream_budget_bytes=args.max_memory, allocation=allocation)
    finally:
        if json_log:
            json_log.close()
    run_log = result.run_log
    log(f"wrote {result.out_dir} ({result.layers} layers, {run_log['shards']} weight file(s), {result.seconds:.1f} s, "
        f"peak memory {run_log['peak_anon_bytes'] / 2**30:.2f} GiB anonymous, "
        f"{run_log['peak_rss_bytes'] / 2**30:.2f} GiB resident with mapped files)")
    return 0


def cmd_dequantize(args) -> int:
    from signround_vllm.checkpoint import write_dequantized_copy

    out = write_dequantized_copy(args.checkpoint, args.out, overwrite=args.overwrite)
    log(f"wrote dequantized bf16 model {out}")
    return 0


def cmd_export(args) -> int:
    from offline_tuner.export import export_checkpoint

    export_checkpoint(args.checkpoint, args.out, args.format, overwrite=args.overwrite, progress=log)
    return 0


def cmd_inspect(args) -> int:
    from signround_vllm.checkpoint import load_tensors, read_quant_config, split_packed_layers
    from signround_vllm.format import bits_per_weight

    config = read_quant_config(args.checkpoint)
    layers, rest = split_packed_layers(load_tensors(args.checkpoint), config, str(args.checkpoint))
    counts: dict[str, int] = {}
    for packed in layers.values():
        key = f"{packed.spec.short_name()} ({bits_per_weight(packed.spec, packed.in_features):.3f} bits/weight)"
        counts[key] = counts.get(key, 0) + 1
    print(json.dumps({"quantization_config": config.to_dict(), "quantized_layers": len(layers),
                      "layers_by_setting": counts, "other_tensors": len(rest)}, indent=2))
    return 0


def cmd_demo(args) -> int:
    from offline_tuner.demo import run_demo

    tune, calib = tuning_from_args(args)
    return run_demo(config_from_args(args), tune=tune, calibration=calib,
                    eval_windows=args.eval_windows, eval_seq_len=args.eval_seq_len, progress=log,
                    events=ProgressDisplay())


def build_parser() -> argparse.ArgumentParser:
    from offline_tuner.allocation import Allocation

    parser = argparse.ArgumentParser(prog="signround", description="SignRound quantization for vLLM")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="the embedded default model, random tiny models").add_subparsers(dest="model_command", required=True)
    prep = model.add_parser("prepare", help="convert the SmolLM2-135M-Instruct GGUF into a transformers folder (once)")
    prep.add_argument("--out", help="output folder (default: .cache/models/SmolLM2-135M-Instruct)")
    prep.set_defaults(func=cmd_model_prepare)
    from offline_tuner.default_model import TINY_FAMILIES

    tiny = model.add_parser("tiny", help="write a random tiny model of a family (dense or mixture-of-experts) "
                                         "to try the tools end to end")
    tiny.add_argument("--family", choices=sorted(TINY_FAMILIES), default="llama")
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--out", required=True, help="output folder")
    tiny.set_defaults(func=cmd_model_tiny)

    q = sub.add_parser("quantize", help="quantize a transformers causal LM into a SignRound checkpoint")
    q.add_argument("model", help="model folder, a hub id already in the local Hugging Face cache (nothing is "
                                 "downloaded), or `default` for the embedded SmolLM2-135M-Instruct")
    q.add_argument("--device", default=None, help="where blocks are tuned: cpu, cuda, cuda:1 ... "
                                                  "(default: the first CUDA GPU if there is one, else cpu)")
    q.add_argument("--max-memory", type=parse_size, metavar="SIZE",
                   help="memory for the activation streams (for example 8GiB); beyond it they are memory-mapped "
                        "files in the work folder beside the output (default: a quarter of this machine's memory)")
    q.add_argument("--max-shard-size", type=parse_size, default="5GB",
                   help="largest weights file of the checkpoint; larger checkpoints are sharded with an index "
                        "(default 5GB)")
    q.add_argument("--out", required=True, help="output checkpoint folder (written atomically)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    q.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last finished block (same settings and seed)")
    q.add_argument("--log-json", metavar="FILE",
                   help="append one JSON object per event to FILE (run_started, iteration, block_done with losses, "
                        "seconds and peak memory, run_finished), for scripts")
    mixed = q.add_argument_group("mixed bits (per-layer bits and group sizes chosen to an average budget)")
    mixed.add_argument("--avg-bits", type=float, metavar="BITS",
                       help="average stored bits per quantized weight, scales and zero points included (W3G64 asym "
                            "costs 3.375): each group of layers vLLM fuses gets the setting among the choices below "
                            "that the model's sensitivity favours, within the budget; --bits/--group-size are then "
                            "ignored")
    mixed.add_argument("--bit-choices", type=_int_list, default=(2, 3, 4, 8), metavar="B,B,...",
                       help="bit widths to choose from (default 2,3,4,8)")
    mixed.add_argument("--group-choices", type=_int_list, default=(32, 64, 128), metavar="G,G,...",
                       help="group sizes to choose from (default 32,64,128)")
    mixed.add_argument("--kind-choices", type=_name_list, metavar="K,K,...",
                       help=f"asym (with zero points), sym (without) or both: the kinds to choose from "
                            f"(default {','.join(Allocation.kind_choices)}; --sym alone means sym)")
    add_quant_args(q)
    q.set_defaults(func=cmd_quantize)

    d = sub.add_parser("dequantize", help="write a plain bf16 copy of a checkpoint's dequantized weights")
    d.add_argument("checkpoint")
    d.add_argument("--out", required=True)
    d.add_argument("--overwrite", action="store_true")
    d.set_defaults(func=cmd_dequantize)

    e = sub.add_parser("export", help="write a checkpoint's integers and scales as compressed-tensors, GPTQ "
                                      "or AWQ for vLLM's built-in methods")
    e.add_argument("checkpoint")
    e.add_argument("--format", required=True, choices=["compressed-tensors", "gptq", "awq"],
                   help="compressed-tensors: every setting (pack-quantized, per-layer settings as config groups); "
                        "gptq: symmetric 4/8-bit, per-layer settings as `dynamic` rules; awq: 4-bit, one setting")
    e.add_argument("--out", required=True, help="output folder (written atomically)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    e.set_defaults(func=cmd_export)

    i = sub.add_parser("inspect", help="validate a checkpoint and summarise its layers")
    i.add_argument("checkpoint")
    i.set_defaults(func=cmd_inspect)

    demo = sub.add_parser("demo", help="prepare, quantize, serve with vLLM, query over the OpenAI API")
    add_quant_args(demo, bits=4, group_size=64)
    demo.set_defaults(recipe="cpu-demo")
    demo.add_argument("--eval-windows", type=int, default=4, help="held-out windows for perplexity")
    demo.add_argument("--eval-seq-len", type=int, default=1024, help="tokens per perplexity window")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SignRoundFormatError, FileExistsError, FileNotFoundError) as e:
        print(f"signround: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("signround: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the tuner's own input errors carry actionable messages
        from offline_tuner.errors import TunerInputError
        from offline_tuner.export import ExportError
        from signround_vllm.server import ServerError

        if isinstance(e, (TunerInputError, ExportError, ServerError)):
            print(f"signround: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
