"""Block-by-block driver for SignRound: capture, tune, replay, resume.

Walks the decoder blocks the model declares (see :mod:`offline_tuner.architecture`), each
called with its own recorded arguments. The first block's inputs are captured once, then two
activation streams run through the blocks: the full-precision model's and the quantized model's. Each block is tuned so
that, fed the quantized stream (the outputs of the already-quantized blocks before it),
its output matches the full-precision stream's output of the same block; so each block
also corrects the error accumulated before it. After each block the integers are
saved in a work folder, so an interrupted run resumes from the last finished block
and ends with the same checkpoint as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save

from signround_vllm.format import LayerQuantSpec, dequantize_ints
from offline_tuner.architecture import record_block_calls
from offline_tuner.errors import TunerInputError
from offline_tuner.plan import QuantPlan
from offline_tuner.signround import (BlockResult, TuneSettings, block_integers, run_block, tune_block,
                                     use_bf16_autocast)

Progress = Callable[[str], None]


@torch.no_grad()
def run_block_batched(block, x: torch.Tensor, kwargs: dict, batch: int, bf16_autocast: bool = False) -> torch.Tensor:
    """The block on x in batches; float32 out (matmuls in bf16 when asked)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16_autocast):
        return torch.cat([run_block(block, x[i:i + batch], kwargs).float() for i in range(0, x.shape[0], batch)])


@dataclasses.dataclass
class BlockLog:
    block: int
    rtn_loss: float
    tuned_loss: float
    best_iter: int
    seconds: float
    fell_back_to_rtn: bool


def _work_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.signround-work"


def tune_model(model, windows: torch.Tensor, plan: QuantPlan, settings: TuneSettings, out_dir: Path,
               resume: bool = False, progress: Progress | None = None,
               iteration_progress: Callable[[int, int, int, float], None] | None = None):
    """Tune every block. Returns (name -> (q, scale, zero), [BlockLog], peak_activation_bytes).

    Resume state lives in a work folder beside out_dir; it is kept until the caller removes it.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    blocks = plan.blocks.blocks
    work = _work_dir(out_dir)
    state_file = work / "state.json"
    run_key = {"config": plan.config.to_dict(), "settings": dataclasses.asdict(settings),
               "windows": list(windows.shape), "windows_sum": int(windows.sum())}
    done_blocks = 0
    logs: list[BlockLog] = []
    if resume and state_file.is_file():
        state = json.loads(state_file.read_text())
        if state["run"] != run_key:
            raise TunerInputError(f"--resume: {work} belongs to a run with other settings or data; "
                             f"rerun without --resume (the old work folder will be replaced)")
        done_blocks = state["done_blocks"]
        logs = [BlockLog(**b) for b in state["blocks"]]
        if progress:
            progress(f"resuming after block {done_blocks}/{len(blocks)} from {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        _write_atomic(state_file, json.dumps({"run": run_key, "done_blocks": 0, "blocks": []}).encode())

    autocast = use_bf16_autocast(settings, device)  # the streams run like the tuning
    calls = record_block_calls(model, plan.blocks, windows, device)
    x_fp = calls.first_inputs
    x_q = x_fp  # the quantized stream; the two part after block 0
    peak_bytes = 3 * x_fp.numel() * x_fp.element_size()  # x_fp, x_q and the next x_q
    integers: dict[str, tuple] = {}
    for i, block in enumerate(blocks):
        prefix = plan.blocks.prefix(i)
        kwargs = calls.block_kwargs[i]
        layer_plans = plan.block_layers(i)
        linears = {n: block.get_submodule(n) for n in layer_plans}
        specs = {n: lp.spec for n, lp in layer_plans.items()}
        original_dtype = next(block.parameters()).dtype
        block.to(device=device, dtype=torch.float32).requires_grad_(False)
        x_fp = run_block_batched(block, x_fp, kwargs, settings.batch_size, autocast)  # this block's targets
        if i < done_blocks:
            saved = load_file(str(work / f"block_{i}.safetensors"))
            block_ints = {n: (saved[f"{n}.q"], saved[f"{n}.scale"], saved.get(f"{n}.zero")) for n in linears}
        else:
            t0 = time.perf_counter()

            def on_iter(it, loss, _i=i):
                if iteration_progress:
                    iteration_progress(_i, it, settings.iters, loss)

            result: BlockResult = tune_block(block, linears, specs, x_q, x_fp, kwargs, settings,
                                             generator_seed=settings.seed * 1000 + i, progress=on_iter)
            block_ints = block_integers(linears, specs, result.tunables)
            tensors = {}
            for n, (q, s, z) in block_ints.items():
                tensors[f"{n}.q"], tensors[f"{n}.scale"] = q.to(torch.uint8).contiguous(), s.contiguous()
                if z is not None:
                    tensors[f"{n}.zero"] = z.to(torch.uint8).contiguous()
            _write_atomic(work / f"block_{i}.safetensors", save(tensors))
            block_ints = {n: (t[0].to(torch.int64), t[1], t[2].to(torch.int64) if t[2] is not None else None)
                          for n, t in block_ints.items()}
            log = BlockLog(block=i, rtn_loss=result.final_rtn_loss, tuned_loss=result.final_tuned_loss,
                           best_iter=result.best_iter, seconds=time.perf_counter() - t0,
                           fell_back_to_rtn=result.fell_back_to_rtn)
            logs.append(log)
            _write_atomic(state_file, json.dumps({"run": run_key, "done_blocks": i + 1,
                                                  "blocks": [dataclasses.asdict(b) for b in logs]}).encode())
            if progress:
                change = (1 - log.tuned_loss / log.rtn_loss) * 100 if log.rtn_loss > 0 else 0.0
                note = "  (tuning did not beat round-to-nearest: kept round-to-nearest)" if log.fell_back_to_rtn else ""
                progress(f"block {i + 1}/{len(blocks)}: loss round-to-nearest {log.rtn_loss:.3e} -> "
                         f"SignRound {log.tuned_loss:.3e} ({change:.0f}% lower), {log.seconds:.1f} s{note}")
        # Replace the weights by their quantized values: the quantized stream goes on through them.
        with torch.no_grad():
            for n, lin in linears.items():
                q, s, z = block_ints[n]
                lin.weight.copy_(_dequantize_ints(q, s, z, specs[n]))
                integers[prefix + n] = (q, s, z)
        x_q = run_block_batched(block, x_q, kwargs, settings.batch_size, autocast)
        if not (torch.isfinite(x_q).all() and torch.isfinite(x_fp).all()):
            raise TunerInputError(f"block {i}: non-finite activations after quantization; the model's weights or "
                             f"calibration data contain NaN/Inf")
        block.to(device="cpu", dtype=original_dtype)
    return integers, logs, peak_bytes


def _dequantize_ints(q, scale, zero, spec: LayerQuantSpec) -> torch.Tensor:
    """The format's dequantization, for the tuner's [N, K] orientation."""
    return dequantize_ints(q.t(), scale.t(), zero.t() if zero is not None else None, spec).t()


def _write_atomic(path: Path, data: bytes) -> None:
    """A kill leaves the old file or the new one, never a truncated one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def remove_work_dir(out_dir: Path) -> None:
    shutil.rmtree(_work_dir(out_dir), ignore_errors=True)
