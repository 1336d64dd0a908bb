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
from signround_vllm.format import SignRoundConfig, pack_linear
from offline_tuner.errors import TunerInputError
from offline_tuner.plan import QuantPlan, resolve_plan
from offline_tuner.quant_core import quantize_weight_to_ints
from offline_tuner.signround import TuneSettings

Progress = Callable[[str], None]


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
    except OSError as e:
        raise TunerInputError(f"{path}: the model's weights cannot be read ({e})") from None
    model.eval()
    return model


def packed_state_dict(model, plan: QuantPlan, quantized_weights: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """The model's state dict with each quantized linear replaced by its packed tensors.

    quantized_weights maps module name -> (q [N, K] ints, scale [N, K//G], zero or None).
    """
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to embed_tokens; transformers re-ties on load
    for name, (q, scale, zero) in quantized_weights.items():
        packed = pack_linear(q, scale, zero, plan.layers[name].spec)
        del state[f"{name}.weight"]
        state.update(packed.tensors(name))
    return state


def hf_config_with_quantization(model, config: SignRoundConfig) -> dict:
    d = model.config.to_dict()
    d["quantization_config"] = config.to_dict()
    return d


def quantize_rtn(model, plan: QuantPlan, progress: Progress | None = None) -> dict[str, tuple]:
    """Round-to-nearest integers for every layer of the plan: name -> (q, scale, zero)."""
    out = {}
    for i, (name, lp) in enumerate(plan.layers.items()):
        out[name] = quantize_weight_to_ints(model.get_submodule(name).weight.detach(), lp.spec)
        if progress and ((i + 1) % 20 == 0 or i + 1 == len(plan.layers)):
            progress(f"round-to-nearest: {i + 1}/{len(plan.layers)} layers")
    return out


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Which text the tuner sees: windows of seq_len tokens drawn with the tuner's seed."""

    n_samples: int = 128
    seq_len: int = 2048
    text_file: str | None = None  # .txt or .jsonl; None = the built-in Wikipedia calibration split

    def describe(self) -> str:
        src = self.text_file or "built-in Wikipedia calibration split"
        return f"{self.n_samples} x {self.seq_len} tokens from {src}"


# name -> (tune settings, calibration). Every field can also be set alone on the command line.
RECIPES: dict[str, tuple[TuneSettings, Calibration]] = {
    "default": (TuneSettings(iters=200, batch_size=8), Calibration(128, 2048)),
    "light": (TuneSettings(iters=50, batch_size=8), Calibration(128, 2048)),
    "best": (TuneSettings(iters=1000, batch_size=8), Calibration(512, 2048)),
    # Short enough for the README demo on 2 CPU cores (minutes for SmolLM2-135M).
    "cpu-demo": (TuneSettings(iters=40, batch_size=4), Calibration(32, 256)),
}


@dataclasses.dataclass(frozen=True)
class QuantizeResult:
    out_dir: Path
    seconds: float
    layers: int
    run_log: dict


RUN_LOG_FILE = "signround_run.json"


def calibration_windows(model_dir, calibration: Calibration, seed: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    from offline_tuner.text_data import read_text_file, token_windows, wikipedia_text

    text = read_text_file(calibration.text_file) if calibration.text_file else wikipedia_text("calibration")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise TunerInputError(f"{model_dir}: no usable tokenizer for calibration ({e})") from None
    try:
        return token_windows(tokenizer, text, calibration.n_samples, calibration.seq_len, seed=seed)
    except ValueError as e:
        raise TunerInputError(f"calibration text ({calibration.describe()}): {e}") from None


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def quantize_checkpoint(model_dir: str | os.PathLike, out_dir: str | os.PathLike, config: SignRoundConfig,
                        tune: TuneSettings | None = None, calibration: Calibration | None = None,
                        overwrite: bool = False, resume: bool = False, progress: Progress | None = None,
                        iteration_progress=None) -> QuantizeResult:
    """Quantize a model folder into a SignRound checkpoint folder (written atomically).

    tune=None or tune.iters == 0: round-to-nearest, no calibration data needed.
    """
    from offline_tuner.blockwise import remove_work_dir, tune_model

    t0 = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another output folder or pass --overwrite")
    model = load_causal_lm(model_dir)
    tuning = tune is not None and tune.iters > 0
    plan = resolve_plan(model, config, tuning=tuning)
    check_non_finite_weights(model)
    run_log: dict = {"model": str(model_dir), "quantization": config.to_dict(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if not tuning:
        quantized = quantize_rtn(model, plan, progress)
        config = dataclasses.replace(config, tuner={"method": "rtn", "iters": 0})
    else:
        calibration = calibration or Calibration()
        if progress:
            progress(f"calibration: {calibration.describe()}")
        windows = calibration_windows(model_dir, calibration, tune.seed)
        quantized, block_logs, act_bytes = tune_model(model, windows, plan, tune, out, resume=resume,
                                                      progress=progress, iteration_progress=iteration_progress)
        config = dataclasses.replace(config, tuner={
            "method": "signround", **dataclasses.asdict(tune), "n_samples": calibration.n_samples,
            "seq_len": calibration.seq_len, "calibration": calibration.text_file or "wikipedia"})
        run_log.update(blocks=[dataclasses.asdict(b) for b in block_logs], cached_activation_bytes=act_bytes,
                       calibration=dataclasses.asdict(calibration), settings=dataclasses.asdict(tune))
    assert set(quantized) == set(plan.layers), "every planned layer is quantized"
    state = packed_state_dict(model, plan, quantized)
    seconds = time.perf_counter() - t0
    run_log.update(seconds=round(seconds, 2), peak_rss_bytes=_peak_rss_bytes(), tuner=config.tuner)
    write_model_folder(out, state, hf_config_with_quantization(model, config), source_dir=model_dir,
                       overwrite=overwrite, extra_json={RUN_LOG_FILE: run_log})
    remove_work_dir(out)
    return QuantizeResult(out_dir=out, seconds=seconds, layers=len(quantized), run_log=run_log)


def check_non_finite_weights(model) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise TunerInputError(f"weight {name} contains NaN or Inf; the model cannot be quantized")
