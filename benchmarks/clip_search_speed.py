"""Speed of the clipping search (offline_tuner.quant_core.search_clipping) at realistic layer shapes, this
checkout against the quant_core of another git revision, side by side in one run, with a check that both
choose the very same factors.

    python benchmarks/clip_search_speed.py --against 87d4295 [--shapes 1b|8b|smollm] [--repeats 3]

Random weights (speed does not depend on their values) with heavy tails, random importance. Each row:
median seconds of `--repeats` calls of each version, alternating which goes first, and their ratio.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

benchlib.use_checkout_packages()
from offline_tuner import quant_core  # noqa: E402
from signround_vllm.format import LayerQuantSpec  # noqa: E402

# (out, in) features of the distinct linear shapes of a decoder block
SHAPES = {"smollm": [(576, 576), (1536, 576), (576, 1536)],
          "1b": [(2048, 2048), (8192, 2048), (2048, 8192)],
          "8b": [(4096, 4096), (14336, 4096), (4096, 14336)]}
SPECS = [LayerQuantSpec(2, 32, False), LayerQuantSpec(4, 64, False), LayerQuantSpec(3, 32, True),
         LayerQuantSpec(4, 64, True)]


def quant_core_at(rev: str):
    """The module offline_tuner/quant_core.py as it was at git revision `rev`."""
    text = subprocess.run(["git", "show", f"{rev}:offline_tuner/quant_core.py"], cwd=benchlib.REPO, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "quant_core_then.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("quant_core_then", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(fn, *args) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", required=True, help="git revision whose clipping search to compare with")
    p.add_argument("--shapes", choices=sorted(SHAPES), default="1b")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/clip-search-speed.md")
    args = p.parse_args(argv)
    then = quant_core_at(args.against)
    gen = torch.Generator().manual_seed(0)
    rows, payload = [], []
    for n, k in SHAPES[args.shapes]:
        w = torch.randn(n, k, generator=gen) * torch.rand(n, k, generator=gen) ** 2
        h = torch.rand(k, generator=gen)
        for spec in SPECS:
            times, chosen = {"now": [], "then": []}, {}
            for r in range(args.repeats):
                order = [("now", quant_core.search_clipping), ("then", then.search_clipping)]
                for name, fn in (order if r % 2 == 0 else order[::-1]):
                    seconds, chosen[name] = timed(fn, w, spec, h)
                    times[name].append(seconds)
            if not torch.equal(chosen["now"], chosen["then"]):
                raise SystemExit(f"{n} x {k} {spec.short_name()}: the two versions chose different factors")
            now, then_s = benchlib.median_and_spread(times["now"])[0], benchlib.median_and_spread(times["then"])[0]
            rows.append([f"{n} x {k}", spec.short_name(), f"{then_s:.3f}", f"{now:.3f}", f"{then_s / now:.2f}x"])
            payload.append({"shape": [n, k], "spec": spec.short_name(), "then_s": then_s, "now_s": now})
            benchlib.log("clip-search", " | ".join(rows[-1]))
    md = [f"# Clipping search speed: this checkout against {args.against}", "",
          f"Machine: {benchlib.machine()}.", "",
          f"Command: `python benchmarks/clip_search_speed.py --against {args.against} --shapes {args.shapes} "
          f"--repeats {args.repeats}`. Median seconds of {args.repeats} calls each, alternating which goes first; "
          "both versions chose the very same factors in every row.", "",
          *benchlib.markdown_table(["layer (out x in)", "setting", f"{args.against} s", "now s", "speed-up"], rows)]
    out = Path(args.out)
    benchlib.write_report(out.parent, out.stem, "\n".join(md), {"against": args.against, "rows": payload})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
