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
    """`default` (or an empty value) means the embedded SmolLM2-135M-Instruct, prepared on first use."""
    if arg in ("", "default"):
        from offline_tuner.default_model import prepare_default_model

        return prepare_default_model(progress=log)
    return Path(arg)


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
    p.add_argument("--iters", type=int, default=0,
                   help="SignRound iterations per block; 0 = round-to-nearest (default %(default)s)")
    p.add_argument("--keep-unquantized", nargs="*", default=["lm_head"], metavar="MODULE",
                   help="modules left in full precision (default: lm_head)")
    p.add_argument("--layer-override", action="append", metavar="MODULE:key=value,...",
                   help="per-layer settings, e.g. model.layers.0.mlp.down_proj:bits=8 (repeatable)")


def cmd_model_prepare(args) -> int:
    from offline_tuner.default_model import prepare_default_model

    t0 = time.perf_counter()
    path = prepare_default_model(Path(args.out) if args.out else None, progress=log)
    log(f"default model ready at {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_quantize(args) -> int:
    from offline_tuner.quantize import quantize_checkpoint

    if args.iters != 0:
        raise SignRoundFormatError("--iters > 0 (SignRound tuning) is not available yet in this version; "
                                   "use --iters 0 for round-to-nearest")
    config = config_from_args(args)
    model = resolve_model(args.model)
    log(f"quantizing {model} -> {args.out} ({config.default.short_name()}, round-to-nearest)")
    result = quantize_checkpoint(model, args.out, config, overwrite=args.overwrite, progress=log)
    log(f"wrote {result.out_dir} ({result.layers} layers, {result.seconds:.1f} s)")
    return 0


def cmd_dequantize(args) -> int:
    from signround_vllm.checkpoint import write_dequantized_copy

    out = write_dequantized_copy(args.checkpoint, args.out, overwrite=args.overwrite)
    log(f"wrote dequantized bf16 model {out}")
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

    return run_demo(bits=args.bits, group_size=args.group_size, sym=args.sym, eval_windows=args.eval_windows,
                    eval_seq_len=args.eval_seq_len, progress=log)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="signround", description="SignRound quantization for vLLM")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="the embedded default model").add_subparsers(dest="model_command", required=True)
    prep = model.add_parser("prepare", help="convert the SmolLM2-135M-Instruct GGUF into a transformers folder (once)")
    prep.add_argument("--out", help="output folder (default: .cache/models/SmolLM2-135M-Instruct)")
    prep.set_defaults(func=cmd_model_prepare)

    q = sub.add_parser("quantize", help="quantize a transformers causal LM into a SignRound checkpoint")
    q.add_argument("model", help="model folder, or `default` for the embedded SmolLM2-135M-Instruct")
    q.add_argument("--out", required=True, help="output checkpoint folder (written atomically)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_quant_args(q)
    q.set_defaults(func=cmd_quantize)

    d = sub.add_parser("dequantize", help="write a plain bf16 copy of a checkpoint's dequantized weights")
    d.add_argument("checkpoint")
    d.add_argument("--out", required=True)
    d.add_argument("--overwrite", action="store_true")
    d.set_defaults(func=cmd_dequantize)

    i = sub.add_parser("inspect", help="validate a checkpoint and summarise its layers")
    i.add_argument("checkpoint")
    i.set_defaults(func=cmd_inspect)

    demo = sub.add_parser("demo", help="prepare, quantize, serve with vLLM, query over the OpenAI API")
    demo.add_argument("--bits", type=int, default=4, choices=SUPPORTED_BITS)
    demo.add_argument("--group-size", type=int, default=64, choices=SUPPORTED_GROUP_SIZES)
    demo.add_argument("--sym", action="store_true")
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
        from offline_tuner.quantize import TunerInputError
        from signround_vllm.server import ServerError

        if isinstance(e, (TunerInputError, ServerError)):
            print(f"signround: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
