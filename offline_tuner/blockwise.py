"""Block-by-block SignRound: load a block, tune it, pack and write it, replay it, give it back.

Walks the decoder blocks the model declares (see :mod:`offline_tuner.architecture`), each called
with its own recorded arguments. The first block's inputs are captured once, then two activation
streams run through the blocks: the full-precision model's and the quantized model's. Each block is
tuned so that, fed the quantized stream (the outputs of the already-quantized blocks before it), its
output matches the full-precision stream's output of the same block; so each block also corrects the
error accumulated before it.

Only one block's weights are in memory at a time: each is read from the model's files when its turn
comes and given back after. Its packed tensors go straight into the checkpoint's shards in the work
folder, which are also the resume state: a resumed run replays the finished blocks from them.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import time
from pathlib import Path


import torch

from signround_vllm.checkpoint import write_file_atomically
from signround_vllm.format import QWEIGHT, QZEROS, SCALES, PackedLinear, dequantize_packed, pack_linear
from signround_vllm.shards import ShardedWriter
from offline_tuner.architecture import record_block_calls
from offline_tuner.compiling import AUTO_COMPILE_WORK, compile_pays
from offline_tuner.errors import TunerInputError
from offline_tuner.memory import MemoryPeak, return_freed_memory
from offline_tuner.model_source import ModelSource, release
from offline_tuner.plan import QuantPlan
from offline_tuner.signround import BlockResult, TuneSettings, block_integers, tune_block, use_bf16_autocast
from offline_tuner.streams import ActivationStreams, default_stream_budget_bytes, run_block_in_place
from offline_tuner.events import Event, EventSink, Progress



@dataclasses.dataclass
class BlockLog:
    block: int
    rtn_loss: float
    tuned_loss: float
    best_iter: int
    seconds: float
    fell_back_to_rtn: bool
    # Mixture-of-experts blocks: calibration tokens the full-precision model routes to each expert, by the
    # experts' stored module name; the experts that got none keep round-to-nearest.
    expert_tokens: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    def experts_without_tokens(self) -> dict[str, list[int]]:
        return {name: [e for e, c in enumerate(counts) if c == 0] for name, counts in self.expert_tokens.items()
                if 0 in counts}


class ExpertTokenCounter:
    """Counts the tokens a block's routers send to each expert while the block runs, read from the arguments
    of its experts modules (transformers 5 calls them as experts(hidden_states, top_k_index, top_k_weights))."""

    def __init__(self, block: torch.nn.Module, expert_params: dict[str, torch.Tensor]):
        self.counts: dict[str, torch.Tensor] = {}  # experts module name in the block -> tokens per expert
        self._hooks = []
        for module_name in dict.fromkeys(n.rpartition(".")[0] for n in expert_params):
            n_experts = next(p.shape[0] for n, p in expert_params.items() if n.rpartition(".")[0] == module_name)
            self._hooks.append(block.get_submodule(module_name).register_forward_pre_hook(
                functools.partial(self._count, module_name, n_experts), with_kwargs=True))

    def _count(self, module_name, n_experts, module, args, kwargs) -> None:
        index = args[1] if len(args) > 1 else kwargs.get("top_k_index")
        if not isinstance(index, torch.Tensor) or index.is_floating_point():
            return  # an experts module called some other way: no counts, so no expert is singled out
        index = index.reshape(-1).cpu()
        index = index[(index >= 0) & (index < n_experts)]  # ids past the last expert mark dropped slots
        counts = torch.bincount(index, minlength=n_experts)
        self.counts[module_name] = self.counts.get(module_name, 0) + counts

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


class InputEnergy:
    """Mean squared input of each channel of a block's linear layers while the block runs (the weights of
    the clipping search), by parameter name; expert weights get none (their tokens differ per expert)."""

    def __init__(self, block: torch.nn.Module, params: list[str]):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._hooks = []
        for name in params:
            owner = block.get_submodule(name.rpartition(".")[0])
            if isinstance(owner, torch.nn.Linear):
                self._hooks.append(owner.register_forward_pre_hook(functools.partial(self._add, name)))

    def _add(self, name, module, args) -> None:
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        self.sums[name] = self.sums.get(name, 0) + (x * x).sum(0)
        self.counts[name] = self.counts.get(name, 0) + x.shape[0]

    def means(self) -> dict[str, torch.Tensor]:
        return {n: s / self.counts[n] for n, s in self.sums.items()}

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


class WorkFolder:
    """The checkpoint being written, beside its final place (`.NAME.signround-work`): its shards and
    `state.json` (the run's settings and finished blocks). Renamed into place when complete."""

    STATE = "state.json"

    def __init__(self, out_dir: Path, run_key: dict, resume: bool):
        self.path = out_dir.parent / f".{out_dir.name}.signround-work"
        self.run_key = run_key
        self.blocks: list[dict] = []
        state_file = self.path / self.STATE
        if resume and state_file.is_file():
            state = json.loads(state_file.read_text())
            if state["run"] != run_key:
                raise TunerInputError(f"--resume: {self.path} belongs to a run with other settings or data; "
                                      f"rerun without --resume (the old work folder will be replaced)")
            self.blocks = state["blocks"]
            self.resumed = True
        else:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir(parents=True)
            self.resumed = False
            self._save()

    @property
    def done_blocks(self) -> int:
        return len(self.blocks)

    def block_done(self, log: BlockLog) -> None:
        self.blocks.append(dataclasses.asdict(log))
        self._save()

    def _save(self) -> None:
        write_file_atomically(self.path / self.STATE, json.dumps({"run": self.run_key, "done_blocks": len(self.blocks),
                                                                  "blocks": self.blocks}))


def capture_block_calls(model, source: ModelSource, blocks, windows: torch.Tensor, device: torch.device,
                        first_inputs: torch.Tensor | None = None):
    """record_block_calls with the weights that run before the blocks (embeddings, ...) read from the files
    for the call and given back after; the output head is not needed."""
    head = model.get_output_embeddings()
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    outside = [n for n, p in model.named_parameters()
               if not n.startswith(blocks.path + ".") and id(p) not in head_params]
    source.materialize(model, outside)
    calls = record_block_calls(model, blocks, windows, device, first_inputs=first_inputs)
    release(model, outside)
    return_freed_memory()
    return calls


def tune_blocks(model, source: ModelSource, windows: torch.Tensor, plan: QuantPlan, settings: TuneSettings,
                writer: ShardedWriter, work: WorkFolder, memory: MemoryPeak, device: torch.device,
                stream_budget_bytes: int | None = None, progress: Progress | None = None,
                events: EventSink | None = None) -> tuple[list[BlockLog], str]:
    """Tune, pack and write every block. Returns the block logs and where the activation streams were kept.

    Blocks finished by an earlier run (work.done_blocks) are replayed from the packed tensors it wrote.
    The streams stay in memory up to stream_budget_bytes (None: a quarter of the machine's memory) and
    are memory-mapped files in the work folder beyond it. `events` receives `iteration` and `block_done`
    events (see offline_tuner.events).
    """
    blocks = plan.blocks
    autocast = use_bf16_autocast(settings, device)  # the streams run like the tuning
    hidden = model.get_input_embeddings().embedding_dim
    budget = stream_budget_bytes if stream_budget_bytes is not None else default_stream_budget_bytes()
    streams = ActivationStreams((len(windows), windows.shape[1], hidden), settings.stream_dtype, budget,
                                work.path / "streams", device)
    calls = capture_block_calls(model, source, blocks, windows, device, first_inputs=streams.fp)
    streams.q.copy_(streams.fp)  # the quantized stream; the two part after block 0
    if progress:
        progress(f"activation streams: {streams.describe()}")
        if work.resumed:
            progress(f"resuming after block {work.done_blocks}/{len(blocks)} from {work.path}")
    try:
        _tune_each_block(model, source, plan, settings, writer, work, memory, device, streams, calls, autocast,
                         progress, events)
    finally:
        described = streams.describe()
        streams.close()
    return [BlockLog(**b) for b in work.blocks], described


def _tune_each_block(model, source, plan, settings, writer, work, memory, device, streams, calls, autocast,
                     progress, events) -> None:
    blocks = plan.blocks
    for i in range(len(blocks)):
        block_name, kwargs = blocks.module_name(i), calls.block_kwargs[i]
        params = plan.block_params(i)
        block = source.materialize_module(model, block_name).to(device=device, dtype=torch.float32)
        memory.sample()
        weights = {n: block.get_parameter(n) for n in params}
        experts = {n: p for n, p in weights.items() if p.dim() == 3}
        counter = ExpertTokenCounter(block, experts)
        searched = [n for n, lps in params.items() if settings.searches_clipping(lps[0].spec)]
        energy = InputEnergy(block, searched if i >= work.done_blocks else [])
        try:
            fp_finite = run_block_in_place(block, streams.fp, kwargs, settings.batch_size, autocast)  # the targets
        finally:
            counter.close()
            energy.close()
        if i < work.done_blocks:
            packed = {lp.name: _read_packed(writer, lp.name, lp.spec) for lps in params.values() for lp in lps}
            writer.written.update(name for layer, p in packed.items() for name in p.tensors(layer))
        else:
            t0 = time.perf_counter()

            def on_iter(it, loss, _i=i):
                if it == 0 or it + 1 == settings.iters:
                    memory.sample()
                if events:
                    events(Event("iteration", {"block": _i, "n_blocks": len(blocks), "iteration": it,
                                               "iters": settings.iters, "loss": loss}))

            specs = {n: lps[0].spec for n, lps in params.items()}  # the plan gives one spec per parameter
            expert_tokens = {n: counter.counts[n.rpartition(".")[0]] for n in experts
                             if n.rpartition(".")[0] in counter.counts}
            keep_rtn_rows = {n: (c == 0).repeat_interleave(weights[n].shape[1]) for n, c in expert_tokens.items()}
            if settings.compile == "auto":  # decided once, on the first block tuned
                pays = compile_pays(settings.iters, len(blocks), sum(w.numel() for w in weights.values()))
                settings = dataclasses.replace(settings, compile="on" if pays else "off")
                if progress:
                    progress(f"torch.compile of the tuning step: {settings.compile} (--compile auto: on for runs "
                             f"of at least {AUTO_COMPILE_WORK:.0e} iterations x blocks x weights per block)")
            result: BlockResult = tune_block(block, weights, specs, streams.q, streams.fp, kwargs, settings,
                                             generator_seed=settings.seed * 1000 + i, progress=on_iter,
                                             keep_rtn_rows=keep_rtn_rows, importance=energy.means())
            packed = {}
            for n, (q, s, z) in block_integers(weights, specs, result.tunables).items():
                for lp in params[n]:
                    rows = slice(lp.row_start, lp.row_stop)
                    packed[lp.name] = pack_linear(q[rows], s[rows], z[rows] if z is not None else None, lp.spec)
            for layer, p in packed.items():
                writer.write_all(p.tensors(layer))
            writer.sync()  # on disk before the state says so
            log = BlockLog(block=i, rtn_loss=result.final_rtn_loss, tuned_loss=result.final_tuned_loss,
                           best_iter=result.best_iter, seconds=time.perf_counter() - t0,
                           fell_back_to_rtn=result.fell_back_to_rtn,
                           expert_tokens={_experts_stored_name(params[n]): [int(c) for c in counts]
                                          for n, counts in expert_tokens.items()})
            del result
            work.block_done(log)
            if events:
                events(Event("block_done", {**dataclasses.asdict(log), "n_blocks": len(blocks),
                                            "peak_anon_bytes": memory.report()["peak_anon_bytes"]}))
            if progress:
                change = (1 - log.tuned_loss / log.rtn_loss) * 100 if log.rtn_loss > 0 else 0.0
                note = "  (tuning did not beat round-to-nearest: kept round-to-nearest)" if log.fell_back_to_rtn else ""
                progress(f"block {i + 1}/{len(blocks)}: loss round-to-nearest {log.rtn_loss:.3e} -> "
                         f"SignRound {log.tuned_loss:.3e} ({change:.0f}% lower), {log.seconds:.1f} s{note}")
                for name, idle in log.experts_without_tokens().items():
                    progress(f"  {name}: experts {idle} got no calibration tokens and keep round-to-nearest")
        # The quantized stream goes on through the stored weights, exactly as a server will see them.
        with torch.no_grad():
            for n, lps in params.items():
                rows = weights[n].view(-1, weights[n].shape[-1])
                for lp in lps:
                    rows[lp.row_start:lp.row_stop].copy_(dequantize_packed(packed[lp.name]))
        q_finite = run_block_in_place(block, streams.q, kwargs, settings.batch_size, autocast)
        if not (q_finite and fp_finite):
            raise TunerInputError(f"block {i}: non-finite activations after quantization; the model's weights or "
                                  f"calibration data contain NaN/Inf")
        memory.sample()
        release(model, [f"{block_name}.{n}" for n, _ in block.named_parameters()])
        del packed, weights, experts
        return_freed_memory()


def _experts_stored_name(layers) -> str:
    """The stored module holding a fused expert weight's experts: "model.layers.3.mlp.experts" for the layers
    "model.layers.3.mlp.experts.E.gate_proj"."""
    return layers[0].name.rsplit(".", 2)[0]


def _read_packed(writer: ShardedWriter, layer: str, spec) -> PackedLinear:
    """A layer's packed tensors as an earlier run wrote them into the shards."""
    t = {suffix: writer.read(f"{layer}.{suffix}") for suffix in (QWEIGHT, SCALES, QZEROS)
         if f"{layer}.{suffix}" in writer.entries}
    return PackedLinear(qweight=t[QWEIGHT], scales=t[SCALES], qzeros=t.get(QZEROS), spec=spec)
