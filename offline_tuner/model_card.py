"""The model card (README.md) written into every checkpoint, in the layout Hugging Face model cards use:
YAML metadata first, then what the model is, how it was made and how to serve it."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Mapping

from signround_vllm.format import FORMAT_VERSION, SignRoundConfig, bits_per_weight

CARD_FILE = "README.md"


def average_bits(layers: Mapping[str, object]) -> float:
    """Stored bits per quantized weight (scales and zero points included), weighted by layer size.

    `layers`: objects with spec, in_features and out_features (the tuner's LayerPlan)."""
    total = sum(p.in_features * p.out_features for p in layers.values())
    bits = sum(bits_per_weight(p.spec, p.in_features) * p.in_features * p.out_features for p in layers.values())
    return bits / total if total else 0.0


def model_card(base_model: str, config: SignRoundConfig, layers: Mapping[str, object], run_log: dict,
               run_log_file: str) -> str:
    tuner = config.tuner or {}
    tuned = tuner.get("method") == "signround"
    settings = Counter(p.spec.short_name() for p in layers.values())
    base_name = Path(base_model).name if Path(base_model).exists() else base_model
    tags = ["signround", "quantized", f"{config.default.bits}-bit", "vllm"]
    lines = ["---", f"base_model: {base_name}", "library_name: vllm", "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {t}" for t in tags] + ["---", "", f"# {base_name}, SignRound {config.default.short_name()}", ""]
    method = (f"SignRound (arXiv 2309.05516): rounding offsets and min/max clipping tuned block by block by "
              f"signed gradient descent, {tuner.get('iters')} iterations per block" if tuned
              else "round-to-nearest (no tuning)")
    lines += [f"Weight-only integer quantization of `{base_name}` made with signround-vllm: {method}.", "",
              "## Quantization", "",
              "| | |", "|---|---|",
              f"| default setting | {config.default.short_name()} ({config.default.bits}-bit, "
              f"{'per channel' if config.default.group_size == -1 else f'groups of {config.default.group_size}'}, "
              f"{'symmetric' if config.default.sym else 'asymmetric'}) |",
              f"| layers by setting | {', '.join(f'{k}: {v}' for k, v in sorted(settings.items()))} |",
              f"| left unquantized | {', '.join(config.modules_to_not_convert) or 'none'} |",
              f"| bits per quantized weight | {average_bits(layers):.2f} (scales and zero points included) |"]
    allocation = run_log.get("allocation")
    if allocation:
        lines.append(f"| mixed bits | chosen per group of fused layers for a budget of {allocation['target_bits']} bits "
                     f"per weight from {', '.join(allocation['candidates'])}, by each group's measured sensitivity "
                     f"(see `{run_log_file}`) |")
    if tuned:
        lines += [f"| calibration | {tuner.get('n_samples')} x {tuner.get('seq_len')} tokens of "
                  f"{tuner.get('calibration')} |",
                  f"| batch, seed | {tuner.get('batch_size')}, {tuner.get('seed')} |"]
        blocks = run_log.get("blocks") or []
        if blocks:
            gains = [1 - b["tuned_loss"] / b["rtn_loss"] for b in blocks if b["rtn_loss"] > 0]
            kept = sum(b["fell_back_to_rtn"] for b in blocks)
            lines.append(f"| block loss vs round-to-nearest | {100 * sum(gains) / max(len(gains), 1):.0f}% lower "
                         f"on average over {len(blocks)} blocks ({kept} kept round-to-nearest) |")
            routed = [c for b in blocks for counts in b.get("expert_tokens", {}).values() for c in counts]
            if routed:
                lines.append(f"| experts | {len(routed)}, each tuned on the calibration tokens routed to it "
                             f"(fewest {min(routed)}, most {max(routed)}); {routed.count(0)} got none and kept "
                             f"round-to-nearest |")
    lines += [f"| time | {run_log.get('seconds', 0):.0f} s |", "",
              "Perplexity: not measured when the checkpoint was made (signround-vllm's `benchmarks/quality.py` "
              "measures it against round-to-nearest and bf16).",
              "", "## Serving", "",
              "With the signround-vllm plugin installed (`pip install signround-vllm`), vLLM picks the method up "
              "from `config.json`:", "", "```bash", "vllm serve <this folder> --quantization signround", "```", "",
              "The integers can also be exported for vLLM's built-in methods: "
              "`signround export <this folder> --format compressed-tensors --out <folder>`.", "",
              "## Files", "",
              "- `config.json`: the model's config with its `quantization_config` (the packed format, version "
              f"{FORMAT_VERSION}).",
              f"- `{run_log_file}`: the quantizer's run log (per-block losses, times, peak memory).",
              "- safetensors weights: `qweight` (packed integers), `scales`, `qzeros` per quantized layer.", ""]
    return "\n".join(lines)
