"""Run PyPI auto-round on one model, inside auto-round's own virtual environment.

Called by ``benchmarks/quality.py --autoround`` with the venv's Python; it is not part of the
project and imports nothing from it. The calibration tokens come from a ``.pt`` file written by
the caller (the very windows SignRound tunes on), so both tools see identical samples.

Writes ``<out>/weights.safetensors`` (the fake-quantized linear weights, dequantized by
auto-round itself) and ``<out>/run.json`` (settings, wall time of tuning, peak RSS).
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
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--group-size", type=int, required=True)
    p.add_argument("--sym", action="store_true")
    p.add_argument("--iters", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--threads", type=int)
    p.add_argument("--alg-ext", action="store_true", help="auto-round's SignRoundV2 extensions (enable_alg_ext=True)")
    args = p.parse_args()

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import auto_round
    from auto_round import AutoRound

    if args.threads:
        torch.set_num_threads(args.threads)
    windows = torch.load(args.calibration)
    n_samples, seq_len = windows.shape
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    t0 = time.perf_counter()
    rounder = AutoRound(model, tokenizer, bits=args.bits, group_size=args.group_size, sym=args.sym,
                        iters=args.iters, nsamples=n_samples, seqlen=seq_len, batch_size=args.batch_size,
                        seed=args.seed, dataset=[w.unsqueeze(0) for w in windows], device_map="cpu",
                        **({"enable_alg_ext": True} if args.alg_ext else {}))
    rounder.quantize()
    seconds = time.perf_counter() - t0
    quantized = rounder.model
    weights = {f"{name}.weight": module.weight.detach().to(torch.bfloat16).contiguous()
               for name, module in quantized.named_modules()
               if isinstance(module, torch.nn.Linear) and name != "lm_head"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "weights.safetensors"))
    tool = f"auto-round {auto_round.__version__}" + (" enable_alg_ext" if args.alg_ext else "")
    run = {"tool": tool, "torch": torch.__version__,
           "seconds": seconds, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "bits": args.bits, "group_size": args.group_size, "sym": args.sym, "iters": args.iters,
           "n_samples": n_samples, "seq_len": seq_len, "batch_size": args.batch_size, "seed": args.seed,
           "layers": len(weights), "threads": torch.get_num_threads()}
    (out / "run.json").write_text(json.dumps(run, indent=1))
    print(json.dumps(run), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
