"""Decompress an exported compressed-tensors checkpoint with the compressed-tensors package itself.

Run with that package (0.18 or newer) first on PYTHONPATH; prints one JSON line: per layer, the scheme
compressed-tensors matched and whether its decompressed weight equals ours bit for bit.
    python tests/ct_roundtrip.py EXPORTED_DIR SIGNROUND_DIR
"""
import json
import re
import sys

import torch


def main(exported: str, signround: str) -> None:
    import compressed_tensors
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    from signround_vllm.checkpoint import load_tensors, read_config, read_quant_config, split_packed_layers
    from signround_vllm.format import dequantize_packed

    qconfig = QuantizationConfig.model_validate(read_config(exported)["quantization_config"])
    tensors = load_tensors(exported)
    ours, _ = split_packed_layers(load_tensors(signround), read_quant_config(signround), signround)
    report = {"version": compressed_tensors.__version__, "layers": {}}
    for name, packed in ours.items():
        # The config group whose explicit target names this module, else the one targeting `Linear`.
        named = [g for g in qconfig.config_groups.values()
                 if any(t.startswith("re:") and re.match(t[3:], name) for t in g.targets)]
        scheme = named[0] if named else next(g for g in qconfig.config_groups.values() if "Linear" in g.targets)
        state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".weight_")}
        weight = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
        expected = dequantize_packed(packed, weight.dtype)
        report["layers"][name] = {"bits": scheme.weights.num_bits, "symmetric": scheme.weights.symmetric,
                                  "group_size": scheme.weights.group_size, "dtype": str(weight.dtype),
                                  "equal": bool(torch.equal(weight, expected))}
    report["ignore"] = list(qconfig.ignore or [])
    print("ROUNDTRIP=" + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
