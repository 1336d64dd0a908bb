"""Driver: a transformers causal LM in, a SignRound checkpoint folder out, in bounded memory.

Stages: open the model (built on the meta device, weights left in their files), resolve the plan
(every layer's spec, checked once), lay out the checkpoint's shards, then fill them: round-to-nearest
tensor by tensor, or SignRound block by block (:mod:`offline_tuner.blockwise`), then the tensors kept
as they are. The folder is written beside its final place and renamed into place when complete.
With zero iterations this is round-to-nearest (the baseline). The numeric work is in
:mod:`offline_tuner.quant_core`; the checkpoint layout in :mod:`signround_vllm.format`.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from signround_vllm.checkpoint import commit_folder, write_folder_files
from signround_vllm.format import QWEIGHT, LayerQuantSpec, SignRoundConfig, pack_linear, packed_tensor_specs
from signround_vllm.shards import DEFAULT_MAX_SHARD_BYTES, ShardedWriter, TensorEntry
from offline_tuner.errors import TunerInputError
from offline_tuner.memory import MemoryPeak, return_freed_memory
from offline_tuner.model_source import ModelSource, open_model, tied_parameter_names
from offline_tuner.plan import QuantPlan, resolve_plan
from offline_tuner.quant_core import round_to_nearest_in_row_chunks
from offline_tuner.signround import TuneSettings
from offline_tuner.events import Event, EventSink, Progress
from offline_tuner.model_card import CARD_FILE, model_card

if TYPE_CHECKING:
    from offline_tuner.allocation import Allocation



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


def output_layout(model, plan: QuantPlan, source: ModelSource) -> list[TensorEntry]:
    """Every tensor of the checkpoint, in model order, under its stored name: each planned layer's packed
    tensors in place of its weight, everything else as stored (tied output embeddings once, under the
    input embedding's name; buffers the files lack as the model holds them)."""
    entries = []
    state = model.state_dict(keep_vars=True)
    for param, pieces in plan.layout.pieces.items():
        for piece in pieces:
            lp = plan.layer_of_stored(piece.stored)
            if lp is not None:
                entries += [TensorEntry(f"{lp.name}.{suffix}", dtype, shape) for suffix, (shape, dtype)
                            in packed_tensor_specs(lp.in_features, lp.out_features, lp.spec, lp.name).items()]
            elif piece.stored in source.files:
                entries.append(TensorEntry(piece.stored, source.dtype_of(piece.stored), source.shape_of(piece.stored)))
            else:  # a buffer transformers computes (the files lack it)
                entries.append(TensorEntry(param, state[param].dtype, tuple(state[param].shape)))
    return entries


def hf_config_with_quantization(hf_config, config: SignRoundConfig, untied: bool = False) -> dict:
    """config.json of the checkpoint; `untied`: the output embedding is stored apart from the input one."""
    d = hf_config.to_dict()
    d["quantization_config"] = config.to_dict()
    if untied:
        d["tie_word_embeddings"] = False
        if isinstance(d.get("text_config"), dict) and "tie_word_embeddings" in d["text_config"]:
            d["text_config"]["tie_word_embeddings"] = False
    return d


def fill_remaining(writer: ShardedWriter, source: ModelSource, model, plan: QuantPlan,
                   progress: Progress | None = None) -> None:
    """Write every tensor not yet written, one at a time: planned layers rounded to nearest, the rest
    copied as stored (buffers the files lack come from the model)."""
    todo = [(param, piece) for param, pieces in plan.layout.pieces.items() for piece in pieces]
    for i, (param, piece) in enumerate(todo):
        lp = plan.layer_of_stored(piece.stored)
        if lp is not None:
            if f"{lp.name}.{QWEIGHT}" not in writer.written:
                q, scale, zero = round_to_nearest_in_row_chunks(source.read(plan.source_of(piece.stored)), lp.spec)
                writer.write_all(pack_linear(q, scale, zero, lp.spec).tensors(lp.name))
        elif piece.stored in source.files:
            if piece.stored not in writer.written:
                writer.write(piece.stored, source.read(piece.stored))
        elif param not in writer.written:
            writer.write(param, model.get_buffer(param))
        if progress and ((i + 1) % 50 == 0 or i + 1 == len(todo)):
            progress(f"written: {i + 1}/{len(todo)} tensors")


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
    if len(tokenizer) < 2:  # transformers builds an empty tokenizer from the config when the files are missing
        raise TunerInputError(f"{model_dir}: no usable tokenizer for calibration (the folder has no tokenizer "
                              f"files such as tokenizer.json); copy the tokenizer of the model it came from into it")
    try:
        return token_windows(tokenizer, text, calibration.n_samples, calibration.seq_len, seed=seed)
    except ValueError as e:
        raise TunerInputError(f"calibration text ({calibration.describe()}): {e}") from None


def quantize_checkpoint(model_dir: str | os.PathLike, out_dir: str | os.PathLike, config: SignRoundConfig,
                        tune: TuneSettings | None = None, calibration: Calibration | None = None,
                        overwrite: bool = False, resume: bool = False, progress: Progress | None = None,
                        events: EventSink | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                        device: str | torch.device | None = None,
                        stream_budget_bytes: int | None = None,
                        allocation: "Allocation | None" = None) -> QuantizeResult:
    """Quantize a model (folder or cached hub id) into a SignRound checkpoint folder, written atomically.

    tune=None or not tune.departs_from_rtn: round-to-nearest, no calibration data needed. Weights larger than
    max_shard_bytes are split into shards with an index, as transformers writes them. Blocks are tuned
    on `device` (None: the first CUDA GPU if there is one, else the CPU); the activation streams stay in
    memory up to stream_budget_bytes (None: a quarter of the machine's memory), on disk beyond it.
    """
    from offline_tuner.blockwise import WorkFolder, tune_blocks

    t0 = time.perf_counter()
    memory = MemoryPeak()
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another output folder or pass --overwrite")
    device = tuning_device(device)
    source = open_model(model_dir)
    model = source.empty_model()
    tuning = tune is not None and tune.departs_from_rtn  # block by block, with calibration data
    layout_in_files = source.check_names(model)
    allocation_report = None
    if allocation is None:
        plan = resolve_plan(model, config, tuning=tuning, layout=layout_in_files)
    else:
        if config.layer_overrides:
            raise TunerInputError(f"--avg-bits chooses every layer's settings, so it cannot be combined with "
                                  f"--layer-override ({sorted(config.layer_overrides)[:3]}); keep layers out of "
                                  f"the choice with --keep-unquantized instead")
        # The settings are still to be chosen: this plan only lists the layers, per channel (a setting every
        # layer can be stored with); the candidates that do not fit a layer are set aside by the choice.
        layers_only = dataclasses.replace(config, default=LayerQuantSpec(4, -1, False))
        plan = resolve_plan(model, layers_only, tuning=True, layout=layout_in_files)
        outside = plan.layers_outside_blocks()
        if outside:
            raise TunerInputError(f"--avg-bits chooses the settings of the decoder blocks' layers; "
                                  f"{outside[:3]} lie outside them: keep them unquantized "
                                  f"(lm_head is by default) or quantize with fixed --bits instead")
        config, allocation_report = _allocate(model, source, plan, config, allocation, tune, calibration, device,
                                              progress)
        plan = resolve_plan(model, config, tuning=tuning, layout=layout_in_files)
    outside = plan.layers_outside_blocks() if tuning else []
    if outside and progress:
        progress(f"outside the decoder blocks, rounded to nearest (not tuned): {', '.join(outside[:5])}"
                 f"{' ...' if len(outside) > 5 else ''}")
    config = dataclasses.replace(config, modules_to_not_convert=tuple(dict.fromkeys(
        [*config.modules_to_not_convert, *plan.routers])))  # routers stay dense, and the checkpoint says so
    layout = output_layout(model, plan, source)
    run_log: dict = {"model": str(model_dir), "quantization": config.to_dict(),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if allocation_report is not None:
        run_log["allocation"] = allocation_report
    if outside:
        run_log["rounded_to_nearest_outside_blocks"] = outside
    if events:
        events(Event("run_started", {"model": str(model_dir), "out_dir": str(out), "quantization": config.to_dict(),
                                     "settings": dataclasses.asdict(tune) if tuning else {"iters": 0},
                                     "layers": len(plan.layers), "blocks": len(plan.blocks) if plan.blocks else 0}))
    run_key = {"config": config.to_dict(), "max_shard_bytes": max_shard_bytes,
               "layout": [[e.name, str(e.dtype), list(e.shape)] for e in layout]}
    if tuning:
        calibration = calibration or Calibration()
        if progress:
            progress(f"calibration: {calibration.describe()}")
        windows = calibration_windows(source.path, calibration, tune.seed)
        return_freed_memory()  # tokenizing the text is the run's largest transient before the first block
        run_key.update(settings=dataclasses.asdict(tune), windows=list(windows.shape), windows_sum=int(windows.sum()))
    work = WorkFolder(out, run_key, resume=resume and tuning)
    writer = ShardedWriter(work.path, layout, max_shard_bytes, reuse_existing=work.resumed)
    try:
        if tuning:
            block_logs, streams = tune_blocks(model, source, windows, plan, tune, writer, work, memory, device,
                                              stream_budget_bytes, progress=progress, events=events)
            config = dataclasses.replace(config, tuner={
                "method": "signround", **dataclasses.asdict(tune), "n_samples": calibration.n_samples,
                "seq_len": calibration.seq_len, "calibration": calibration.text_file or "wikipedia"})
            run_log.update(blocks=[dataclasses.asdict(b) for b in block_logs], activation_streams=streams,
                           calibration=dataclasses.asdict(calibration), settings=dataclasses.asdict(tune))
        else:
            config = dataclasses.replace(config, tuner={"method": "rtn", "iters": 0})
        fill_remaining(writer, source, model, plan, progress)
        memory.sample()
        writer.finish()
    except BaseException:
        if not tuning:  # nothing worth resuming: leave no partial shards behind
            shutil.rmtree(work.path, ignore_errors=True)
        raise
    finally:
        writer.close()
        source.close()
    seconds = time.perf_counter() - t0
    run_log.update(seconds=round(seconds, 2), **memory.report(), shards=len(writer.files), tuner=config.tuner)
    hf_config = hf_config_with_quantization(source.hf_config, config, untied=bool(plan.untied))
    write_folder_files(work.path, hf_config, source_dir=source.path, extra_json={RUN_LOG_FILE: run_log})
    (work.path / CARD_FILE).write_text(model_card(str(model_dir), config, plan.layers, run_log, RUN_LOG_FILE))
    (work.path / WorkFolder.STATE).unlink()
    commit_folder(work.path, out, overwrite)
    if events:
        events(Event("run_finished", {"out_dir": str(out), "seconds": round(seconds, 2), "layers": len(plan.layers),
                                      "shards": len(writer.files), **memory.report()}))
    return QuantizeResult(out_dir=out, seconds=seconds, layers=len(plan.layers), run_log=run_log)


def _allocate(model, source, plan, config, allocation, tune, calibration, device, progress):
    """Measure each fused group's sensitivity and choose the settings (see offline_tuner.allocation)."""
    from offline_tuner.allocation import allocated_config, check_budget, measure_sensitivity
    from offline_tuner.signround import use_bf16_autocast

    check_budget(plan, allocation)
    tune = tune or TuneSettings(iters=0)
    calib = Calibration(allocation.n_windows, allocation.seq_len, calibration.text_file if calibration else None)
    candidates = allocation.candidates()
    if progress:
        progress(f"mixed bits: measuring sensitivity to {[s.short_name() for s in candidates]} on {calib.describe()}")
    windows = calibration_windows(source.path, calib, tune.seed)
    groups = measure_sensitivity(model, source, windows, plan, candidates, device,
                                 use_bf16_autocast(tune, device), progress)
    config, report = allocated_config(config, groups, allocation)
    if progress:
        shares = ", ".join(f"{k} {v:.0%}" for k, v in report["settings_by_weight_share"].items())
        progress(f"mixed bits: {report['achieved_bits']:.3f} bits per weight (target {allocation.avg_bits}, scales "
                 f"and zero points included) over {len(groups)} groups of fused layers; weights: {shares}")
        if allocation.avg_bits - report["achieved_bits"] > report["within"]:
            progress(f"mixed bits: {allocation.avg_bits - report['achieved_bits']:.3f} bits below the target: no "
                     f"further change fits it (few, large groups), or every group already has its best setting")
    return config, report


def tuning_device(device: str | torch.device | None) -> torch.device:
    """The device blocks are tuned on; None: the first CUDA GPU if there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise TunerInputError(f"--device {device!r}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise TunerInputError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA GPU(s) here; "
                              f"use --device cpu or a GPU that exists")
    if dev.type not in ("cpu", "cuda"):
        raise TunerInputError(f"--device {device}: the tuner runs on cpu or cuda")
    return dev
