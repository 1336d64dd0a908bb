"""Run llm-compressor's GPTQ or AWQ on one model, inside llm-compressor's own virtual environment.

Called by ``benchmarks/quality.py --anchors gptq awq`` with that venv's Python; it is not part of
the project and imports nothing from it. The calibration tokens come from a ``.pt`` file written
by the caller (the very windows SignRound tunes on), fed to ``oneshot`` as a DataLoader so
llm-compressor neither re-tokenizes nor re-samples them.

Writes ``<out>/weights.safetensors``: the model's whole state dict in bf16 with every quantized
linear weight replaced by its fake-quantized value (quantized and dequantized by
compressed-tensors with the scales and zero points llm-compressor chose). The whole state dict,
not only the linear weights, because AWQ also rescales the norms in front of the layers it
smooths. And ``<out>/run.json`` (settings, wall time of calibration and quantization, peak RSS).
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
    p.add_argument("--algorithm", choices=["gptq", "awq"], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--calibration", required=True, help=".pt file: int64 [n_samples, seq_len] token ids")
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--group-size", type=int, required=True)
    p.add_argument("--sym", action="store_true")
    p.add_argument("--seed", type=int, required=True)
    args = p.parse_args()

    import importlib.metadata

    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    from llmcompressor import oneshot

    if not torch.cuda.is_available():
        # llm-compressor 0.14's AWQ pins cached activations for faster host-to-GPU copies, which raises
        # without an accelerator; on the CPU there is nothing to copy, so pinning is skipped.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    torch.manual_seed(args.seed)
    windows = torch.load(args.calibration)
    n_samples, seq_len = windows.shape
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    scheme = {"targets": ["Linear"], "weights": {"num_bits": args.bits, "type": "int", "symmetric": args.sym,
                                                 "strategy": "group", "group_size": args.group_size}}
    if args.algorithm == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        recipe = [GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])]
    else:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform import AWQModifier

        recipe = [AWQModifier(), QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])]
    samples = [{"input_ids": w.unsqueeze(0), "attention_mask": torch.ones(1, seq_len, dtype=torch.long)}
               for w in windows]
    loader = DataLoader(samples, batch_size=None, shuffle=False)
    t0 = time.perf_counter()
    oneshot(model=model, recipe=recipe, dataset=loader, num_calibration_samples=n_samples, max_seq_length=seq_len)
    seconds = time.perf_counter() - t0

    state, quantized = {}, 0
    with torch.no_grad():
        for name, module in model.named_modules():
            weight_args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
            if isinstance(module, torch.nn.Linear) and weight_args is not None:
                fq = fake_quantize(module.weight.float(), module.weight_scale.float(),
                                   getattr(module, "weight_zero_point", None), weight_args)
                _check_levels(name, fq, args.bits, args.group_size)
                state[f"{name}.weight"] = fq.to(torch.bfloat16)
                quantized += 1
        for key, tensor in model.state_dict().items():
            last = key.rsplit(".", 1)[-1]
            quantization_param = last.startswith(("weight_scale", "weight_zero_point", "weight_g_idx", "input_",
                                                  "output_"))
            if key in state or quantization_param:
                continue
            if key == "lm_head.weight" and model.config.tie_word_embeddings:
                continue
            state[key] = tensor.detach().to(torch.bfloat16).contiguous()
    if quantized == 0:
        raise SystemExit("llm-compressor quantized no linear layer")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "weights.safetensors"))
    run = {"tool": f"llm-compressor {importlib.metadata.version('llmcompressor')} {args.algorithm.upper()}",
           "torch": torch.__version__, "seconds": seconds,
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "bits": args.bits, "group_size": args.group_size, "sym": args.sym, "n_samples": n_samples,
           "seq_len": seq_len, "seed": args.seed, "layers": quantized, "threads": torch.get_num_threads()}
    (out / "run.json").write_text(json.dumps(run, indent=1))
    print(json.dumps(run), flush=True)
    return 0


def _check_levels(name, weight, bits, group_size):
    """Every group of the fake-quantized weight holds at most 2**bits distinct values."""
    groups = weight.reshape(-1, group_size)
    sorted_groups = groups.sort(dim=1).values
    distinct = 1 + (sorted_groups[:, 1:] != sorted_groups[:, :-1]).sum(dim=1)
    if int(distinct.max()) > 2**bits:
        raise SystemExit(f"{name}: a group holds {int(distinct.max())} distinct values after fake quantization, "
                         f"more than 2**{bits}: the scales read back are not the ones used")


if __name__ == "__main__":
    sys.exit(main())
