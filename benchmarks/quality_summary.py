"""One table from many quality reports: every tool's mean served perplexity per recipe and setting, and
the issue's targets checked cell by cell.

    .venv/bin/python benchmarks/quality_summary.py benchmarks/results/quality-served-*.json \
        --out benchmarks/results/quality-summary.md

Each input is a report of `benchmarks/quality.py --out` (the .json, with the .md beside it for its command
and date). Runs are keyed by recipe (iterations, windows, tokens per window, batch), setting, seed and tool;
where several reports hold the same key, the most recent report (by the date in its .md) wins, so a
setting rerun after a tuner change replaces the older figures. Each row names the reports it took.
Reports made with --signround-args (ablations) or on the selection texts are refused: they are not the
tuner's defaults on the evaluation texts.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.benchlib import markdown_table, mean_of, run_perplexity, write_report  # noqa: E402
from benchmarks.quality import setting as parse_setting  # noqa: E402
from signround_vllm.format import LayerQuantSpec, bits_per_weight  # noqa: E402

TOOLS = {"rtn": "RTN", "sr": "SignRound", "autoround": "auto-round", "autoround-ext": "alg-ext",
         "autoscheme": "AutoScheme", "gptq": "GPTQ", "awq": "AWQ"}
TEXTS = ("wiki", "news", "docs")
RECIPE_NAMES = {(40, 32, 256, 4): "cpu-demo (40 iterations, 32 x 256 windows, batch 4)",
                (50, 64, 128, 8): "50 iterations, 64 x 128 windows, batch 8"}


def read_report(path: Path) -> dict:
    """The report's runs with its recipe, date and command; SystemExit naming the problem otherwise."""
    md = path.with_suffix(".md")
    if path.suffix != ".json" or not path.is_file() or not md.is_file():
        raise SystemExit(f"{path}: give the .json of a quality report, with its .md beside it")
    data, text = json.loads(path.read_text()), md.read_text()
    date = re.search(r"Date: (\d{4}-\d\d-\d\d \d\d:\d\d)", text)
    command = re.search(r"^Command: `(.*)`$", text, re.M)
    if not (date and command and "runs" in data and "iters" in data):
        raise SystemExit(f"{path}: not a report of benchmarks/quality.py (no runs, date or command)")
    if "--signround-args" in command[1] or "--texts selection" in command[1]:
        raise SystemExit(f"{path}: an ablation or selection-text report ({command[1]}); summarize default runs "
                         "on the evaluation texts only")
    recipe = (data["iters"], *data["calibration"], data["batch_size"])
    return {"name": md.name, "date": date[1], "recipe": recipe, "runs": data["runs"]}


def served(run: dict, tool: str) -> dict | None:
    """A tool's served perplexity of each text in one run (None where the tool did not run or was not served)."""
    found = {text: run_perplexity(run, tool, text, served=True) for text in TEXTS}
    return found if None not in found.values() else None


def collect(reports: list[dict]) -> dict:
    """{(recipe, setting): {tool: {seed: (perplexities, report name)}}}, the newest report winning."""
    table: dict = {}
    for rep in sorted(reports, key=lambda r: r["date"]):
        for run in rep["runs"]:
            for tool in TOOLS:
                ppl = served(run, tool)
                if ppl is not None:
                    key = (rep["recipe"], run["name"])
                    table.setdefault(key, {}).setdefault(tool, {})[run["seed"]] = (ppl, rep["name"])
    return table


def fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 1000 else f"{x:.2f}"


def storage_cost(setting: str) -> float:
    """Stored bits per weight, scales and zero points included, of a setting of benchmarks/quality.py: a
    uniform setting's (W3G64asym: 3.375), a mixed setting's budget (mixed2.75: 2.75)."""
    spec = parse_setting(setting)
    return bits_per_weight(spec, spec.group_size) if isinstance(spec, LayerQuantSpec) else spec.avg_bits


def targets(setting: str, text: str, means: dict, uniform: dict[str, float] | None = None) -> list[str]:
    """The issue's targets for one text, each as met or missed (only where the anchor ran). uniform: for a
    mixed setting, SignRound's mean on this text at each uniform setting of the same recipe, by name."""
    sr, out = means["sr"], []
    if "rtn" in means:
        out.append(("below RTN" if sr < means["rtn"] else "NOT below RTN"))
    if re.match(r"W[23]G", setting):  # uniform 2 or 3 bits; 4 bits and mixed settings: no worse than any
        if "autoround" in means:
            r = sr / means["autoround"]
            out.append(f"{r:.2f}x auto-round" + ("" if r <= 0.95 else " (target 0.95: missed)"))
        if "autoround-ext" in means:
            out.append("below alg-ext" if sr <= means["autoround-ext"] else
                       f"NOT below alg-ext (+{(sr / means['autoround-ext'] - 1) * 100:.1f}%)")
    else:
        for tool in ("autoround", "autoround-ext", "autoscheme"):
            if tool in means:
                out.append(f"{'at most' if sr <= means[tool] else 'ABOVE'} {TOOLS[tool]}")
    if setting.startswith("mixed") and uniform:
        cost = storage_cost(setting)
        cheaper = {name: ppl for name, ppl in uniform.items() if storage_cost(name) <= cost}
        beaten = [name for name, ppl in sorted(cheaper.items()) if sr >= ppl]
        if cheaper:
            out.append(f"below every uniform setting of at most {cost:g} bits ({', '.join(sorted(cheaper))})"
                       if not beaten else f"NOT below uniform {', '.join(beaten)}")
    worse = [TOOLS[t] for t in ("gptq", "awq") if t in means and sr >= means[t]]
    if any(t in means for t in ("gptq", "awq")):
        out.append("below GPTQ/AWQ" if not worse else f"NOT below {'/'.join(worse)}")
    return out


def render(table: dict, reports: list[dict], argv: list[str]) -> str:
    lines = ["# Quality summary: served perplexity of every tool, SmolLM2-135M-Instruct", "",
             f"Made by `python benchmarks/quality_summary.py {' '.join(argv)}` from "
             f"{len(reports)} reports of `benchmarks/quality.py` (each row names its sources; where reports "
             "overlap, the newest one's runs are used). Means over the seeds each tool ran (the count in brackets "
             "where it is not the same for all tools). `wiki` is in domain, `news` and `docs` out of domain. "
             "Targets (issue 12): below RTN everywhere; at 2-3 bits at most 0.95x auto-round and at most alg-ext; "
             "below GPTQ and AWQ; at 4 bits and for mixed settings no worse than any other tool; mixed settings below "
             "SignRound at every uniform setting of the same recipe that stores at most as many bits per weight.", ""]
    for recipe in sorted({k[0] for k in table}):
        rows, notes = [], []
        uniform = {text: {name: mean_of([ppl[text] for ppl, _ in tools["sr"].values()])
                          for (r, name), tools in table.items()
                          if r == recipe and "sr" in tools and not name.startswith("mixed")} for text in TEXTS}
        for (rec, setting), by_tool in sorted(table.items(), key=lambda kv: kv[0][1]):
            if rec != recipe or "sr" not in by_tool:
                continue
            seeds = {tool: sorted(runs) for tool, runs in by_tool.items()}
            for text in TEXTS:
                means = {tool: mean_of([ppl[text] for ppl, _ in runs.values()]) for tool, runs in by_tool.items()}
                cells = [("-" if tool not in means else fmt(means[tool])
                          + ("" if seeds[tool] == seeds["sr"] else f" ({len(seeds[tool])})")) for tool in TOOLS]
                rows.append([setting, text, *cells, "; ".join(targets(setting, text, means, uniform[text]))])
            sources = sorted({src for runs in by_tool.values() for _, src in runs.values()})
            notes.append(f"- {setting}: seeds {', '.join(map(str, seeds['sr']))}; from {', '.join(sources)}")
        lines += [f"## {RECIPE_NAMES.get(recipe, 'iters %d, %d x %d windows, batch %d' % recipe)}", "",
                  *markdown_table(["setting", "text", *TOOLS.values(), "targets"], rows), "", *notes, ""]
    lines.append("Tool times and memory: each report's tuning-cost table, where the tools ran side by side.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reports", nargs="+", type=Path, help="quality reports (.json, with the .md beside it)")
    p.add_argument("--out", type=Path, help="write the summary to this .md file")
    args = p.parse_args(argv)
    reports = [read_report(path) for path in args.reports]
    table = collect(reports)
    if not any("sr" in by_tool for by_tool in table.values()):
        raise SystemExit("no served SignRound runs in these reports")
    text = render(table, reports, [str(a) for a in argv])
    print(text)
    if args.out:
        write_report(args.out.parent, args.out.stem, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
