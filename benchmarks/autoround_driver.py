"""Run PyPI auto-round on one model, inside auto-round's own virtual environment.

Called by ``benchmarks/quality.py --autoround`` with the venv's Python; it is not part of the
project and imports nothing from it. The calibration tokens come from a ``.pt`` file written by
the caller (the very windows SignRound tunes on), so both tools see identical samples.

Writes ``<out>/weights.safetensors`` (the fake-quantized linear weights, dequantized by
auto-round itself) and ``<out>/run.json`` (settings, wall time of tuning, peak RSS, and each layer's
bits, group size and weight count). ``--avg-bits`` runs auto-round's AutoScheme instead of one setting:
it picks each layer's setting among ``--options`` for that average, then tunes.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--out", required=True)
    p.add_argument("--calibration", required=True, help=".pt file: int64 [n_samples, seq_len] token ids")
    p.add_argument("--bits", type=int, help="one setting for every layer (or --avg-bits)")
    p.add_argument("--group-size", type=int)
    p.add_argument("--avg-bits", type=float, help="AutoScheme: average bits per weight, scales and zero points included")
    p.add_argument("--options", default="2:32,2:64,2:128,3:32,3:64,3:128,4:32,4:64,4:128,8:32,8:64,8:128",
                   help="AutoScheme's candidate settings, bits:group_size[:sym|asym] (the kind defaults to --sym; "
                        "those whose group size does not divide every layer's input size are dropped)")
    p.add_argument("--sym", action="store_true", help="symmetric: the one setting, or the options without a kind")
    p.add_argument("--iters", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--threads", type=int)
    p.add_argument("--alg-ext", action="store_true", help="auto-round's SignRoundV2 extensions (enable_alg_ext=True)")
    args = p.parse_args()
    if (args.avg_bits is None) == (args.bits is None or args.group_size is None):
        p.error("give either --bits and --group-size, or --avg-bits")

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import auto_round
    from auto_round import AutoRound, AutoScheme
    from auto_round.schemes import QuantizationScheme

    if args.threads:
        torch.set_num_threads(args.threads)
    windows = torch.load(args.calibration)
    n_samples, seq_len = windows.shape
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    linears = {name: module for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and name != "lm_head"}
    if args.avg_bits is None:
        setting = {"bits": args.bits, "group_size": args.group_size, "sym": args.sym}
    else:
        options = [option(o, args.sym) for o in args.options.split(",")]
        options = [o for o in options if all(m.in_features % o[1] == 0 for m in linears.values())]
        schemes = [QuantizationScheme.from_dict({"bits": b, "group_size": g, "sym": sym, "data_type": "int",
                                                 "act_bits": 16}) for b, g, sym in options]
        setting = {"scheme": AutoScheme(avg_bits=args.avg_bits, options=schemes)}
        # AutoScheme wants a dataset name, for its scoring pass and then for the tuning: both get the very
        # windows given (scoring: its first `nsamples` in batches; tuning: each window, as without AutoScheme).
        import auto_round.auto_scheme.delta_loss as delta_loss
        import auto_round.calib_dataset as calib_dataset

        def scoring_windows(tokenizer, seqlen, dataset_name=None, seed=42, bs=8, nsamples=512):
            ids = windows[:nsamples, :seqlen]
            return [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids.split(bs)]

        delta_loss.get_dataloader = scoring_windows
        calib_dataset.get_dataloader = lambda *args, **kwargs: [w.unsqueeze(0) for w in windows]
    t0 = time.perf_counter()
    rounder = AutoRound(model, tokenizer, **setting, iters=args.iters, nsamples=n_samples, seqlen=seq_len,
                        batch_size=args.batch_size, seed=args.seed, device_map="cpu",
                        dataset=("calibration windows" if args.avg_bits is not None  # AutoScheme wants a name
                                 else [w.unsqueeze(0) for w in windows]),
                        **({"enable_alg_ext": True} if args.alg_ext else {}))
    rounder.quantize()
    seconds = time.perf_counter() - t0
    quantized = rounder.model
    weights = {f"{name}.weight": module.weight.detach().to(torch.bfloat16).contiguous()
               for name, module in quantized.named_modules()
               if isinstance(module, torch.nn.Linear) and name != "lm_head"}
    chosen = getattr(rounder, "layer_config", None) or {}
    layer_settings = {}  # name -> [bits, group size, weights, symmetric]
    for name in linears:
        c = chosen.get(name, {})
        layer_settings[name] = [c.get("bits", args.bits), c.get("group_size", args.group_size),
                                weights[f"{name}.weight"].numel(), bool(c.get("sym", args.sym))]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "weights.safetensors"))
    tool = (f"auto-round {auto_round.__version__}" + (" enable_alg_ext" if args.alg_ext else "")
            + (" AutoScheme" if args.avg_bits is not None else ""))
    run = {"tool": tool, "torch": torch.__version__,
           "seconds": seconds, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "bits": args.bits, "group_size": args.group_size, "avg_bits": args.avg_bits, "sym": args.sym,
           "iters": args.iters, "layer_settings": layer_settings,
           "n_samples": n_samples, "seq_len": seq_len, "batch_size": args.batch_size, "seed": args.seed,
           "layers": len(weights), "threads": torch.get_num_threads()}
    (out / "run.json").write_text(json.dumps(run, indent=1))
    print(json.dumps(run), flush=True)
    return 0


def option(text: str, default_sym: bool) -> tuple[int, int, bool]:
    """(bits, group size, symmetric) of one --options entry, "bits:group_size" or "bits:group_size:sym|asym"."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("sym", "asym")):
        raise SystemExit(f"--options entry {text!r}: use bits:group_size or bits:group_size:sym|asym")
    return int(parts[0]), int(parts[1]), (parts[2] == "sym") if len(parts) == 3 else default_sym


if __name__ == "__main__":
    sys.exit(main())
