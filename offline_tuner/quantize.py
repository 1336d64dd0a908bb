"""Driver: a transformers causal LM in, a SignRound checkpoint folder out.

With zero iterations this is round-to-nearest (the baseline). The numeric work
is in :mod:`offline_tuner.quant_core`; the checkpoint layout in
:mod:`signround_vllm.format` and :mod:`signround_vllm.checkpoint`.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Callable

import torch

from signround_vllm.checkpoint import write_model_folder
from signround_vllm.format import SignRoundConfig, SignRoundFormatError, pack_linear
from offline_tuner.quant_core import quantize_weight_to_ints

Progress = Callable[[str], None]


class TunerInputError(ValueError):
    """The model, settings or calibration data given to the tuner cannot be used."""


def load_causal_lm(model_dir: str | os.PathLike, dtype: torch.dtype | str = "auto"):
    """Load a transformers causal LM on CPU, with an actionable error for bad paths."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise TunerInputError(f"{path}: not a model folder (no config.json); give a local transformers "
                              f"model folder, e.g. the output of `signround model prepare`")
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "quantization_config", None) is not None:
        raise TunerInputError(f"{path}: the model is already quantized "
                              f"({config.quantization_config.get('quant_method', '?')}); give an unquantized model")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except ValueError as e:
        raise TunerInputError(f"{path}: cannot be loaded as a causal language model ({e})") from None
    model.eval()
    return model


def quantizable_linears(model, config: SignRoundConfig) -> dict[str, torch.nn.Linear]:
    """The nn.Linear modules to quantize, by name, in model order."""
    return {name: mod for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and config.spec_for(name) is not None}


def check_quantizable(linears: dict[str, torch.nn.Linear], config: SignRoundConfig) -> None:
    problems = []
    for name, mod in linears.items():
        try:
            config.spec_for(name).check_in_features(mod.in_features, name)
        except SignRoundFormatError as e:
            problems.append(str(e))
    if problems:
        raise TunerInputError("cannot quantize these layers with the requested settings:\n  " +
                              "\n  ".join(problems) + "\n(keep them unquantized with modules_to_not_convert, "
                              "or choose a group size that divides their in_features)")


def packed_state_dict(model, config: SignRoundConfig, quantized_weights: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """The model's state dict with each quantized linear replaced by its packed tensors.

    quantized_weights maps module name -> (q [N, K] ints, scale [N, K//G], zero or None).
    """
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to embed_tokens; transformers re-ties on load
    for name, (q, scale, zero) in quantized_weights.items():
        packed = pack_linear(q, scale, zero, config.spec_for(name))
        del state[f"{name}.weight"]
        state.update(packed.tensors(name))
    return state


def hf_config_with_quantization(model, config: SignRoundConfig) -> dict:
    d = model.config.to_dict()
    d["quantization_config"] = config.to_dict()
    return d


def quantize_rtn(model, config: SignRoundConfig, progress: Progress | None = None) -> dict[str, tuple]:
    """Round-to-nearest integers for every quantizable linear: name -> (q, scale, zero)."""
    linears = quantizable_linears(model, config)
    check_quantizable(linears, config)
    out = {}
    for i, (name, mod) in enumerate(linears.items()):
        out[name] = quantize_weight_to_ints(mod.weight.detach(), config.spec_for(name))
        if progress and (i + 1) % 20 == 0 or progress and i + 1 == len(linears):
            progress(f"round-to-nearest: {i + 1}/{len(linears)} layers")
    return out


@dataclasses.dataclass(frozen=True)
class QuantizeResult:
    out_dir: Path
    seconds: float
    layers: int


def quantize_checkpoint(model_dir: str | os.PathLike, out_dir: str | os.PathLike, config: SignRoundConfig,
                        overwrite: bool = False, progress: Progress | None = None) -> QuantizeResult:
    """Round-to-nearest quantization of a model folder into a SignRound checkpoint folder."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another output folder or pass --overwrite")
    model = load_causal_lm(model_dir)
    quantized = quantize_rtn(model, config, progress)
    config = dataclasses.replace(config, tuner={"method": "rtn", "iters": 0})
    state = packed_state_dict(model, config, quantized)
    write_model_folder(out, state, hf_config_with_quantization(model, config), source_dir=model_dir,
                       overwrite=overwrite)
    return QuantizeResult(out_dir=out, seconds=time.perf_counter() - t0, layers=len(quantized))
