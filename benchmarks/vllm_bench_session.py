"""Run several `vllm bench latency|throughput` commands in one process, on one engine.

    python benchmarks/vllm_bench_session.py SESSION.json

Used by ``benchmarks/serving.py``; not a user command. SESSION.json::

    {"seed": 0,
     "commands": [["bench", "latency", "--model", "CKPT", ...], ["bench", "throughput", ...]],
     "weight_memory": {"engine_args": ["--model", "CKPT", ...], "out": "memory.json"} or null,
     "status": "status.json"}

Each command goes through vLLM's own command line (``vllm.entrypoints.cli.main.main`` with
``sys.argv`` set), so its arguments, measurement loop and ``--output-json`` are exactly those
of ``vllm <command>``. Two differences, both to save start-ups on a small CPU machine:

- ``LLM.from_engine_args`` is wrapped so that commands whose engine arguments are equal get
  the same engine (an engine start costs 20-90 s here: three processes import vLLM, and
  torch.compile runs unless ``--enforce-eager``). Different engine arguments start a new engine
  after shutting the previous one down.
- numpy and ``random`` are seeded with ``seed`` before each command: ``vllm bench latency``
  draws its prompt token ids from the unseeded global numpy generator.

Engine arguments must be equal field by field to share: give ``--tokenizer`` explicitly
(``vllm bench throughput`` fills it in, ``vllm bench latency`` does not).

``weight_memory`` measures, on the engine the commands ran on (or, without commands, on one
built from ``engine_args``), the bytes held by the loaded model after vLLM's
``process_weights_after_loading`` repacked them (see :func:`loaded_weight_bytes`): the weights
as served, which the CPU log does not report (vLLM's "Model loading took X GiB" line is printed
by the GPU runner only).

The status file is rewritten after every step, so a session killed by the caller's timeout
still says which steps finished.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import json
import os
import random
import sys
import time
import traceback
from pathlib import Path

# The model runs in a spawned worker process; the function that measures it is sent there
# pickled (vLLM refuses that unless this is set).
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


def loaded_weight_bytes(model) -> dict:
    """Bytes of the model's weights as loaded in the worker (not the KV cache).

    Counted once per storage: parameters, buffers, tensor attributes of every module, and the
    tensors captured by the ``cpu_linear`` closures that vLLM's CPU backend installs
    (``dispatch_cpu_unquantized_gemm``). A oneDNN GEMM handle holds a packed copy of an
    unquantized weight that no tensor shows (the linear's own weight is then emptied; the
    embedding keeps its weight beside the copy used for the tied lm_head): it is counted as
    k * n * element size of that weight ("onednn_packed", oneDNN's block padding not included).
    """
    import torch

    seen: set[int] = set()
    totals = {"parameters": 0, "buffers": 0, "other_tensors": 0, "onednn_packed": 0}
    by_dtype: dict[str, int] = {}

    def add(t, kind: str) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            return
        seen.add(storage.data_ptr())
        totals[kind] += storage.nbytes()
        by_dtype[str(t.dtype)] = by_dtype.get(str(t.dtype), 0) + storage.nbytes()

    for p in model.parameters():
        add(p, "parameters")
    for b in model.buffers():
        add(b, "buffers")
    for module in model.modules():
        for name, value in vars(module).items():
            if "cache" not in name:  # the KV cache is bound to the attention layers as kv_cache
                add(value, "other_tensors")
        fn = getattr(module, "cpu_linear", None)
        captured = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())]
        for value in captured + list(getattr(fn, "__defaults__", None) or ()):
            add(value, "other_tensors")
            if hasattr(value, "handler_tensor") and hasattr(value, "k") and hasattr(value, "n"):
                dtype = getattr(getattr(module, "weight", None), "dtype", torch.bfloat16)
                nbytes = value.k * value.n * torch.empty((), dtype=dtype).element_size()
                totals["onednn_packed"] += nbytes
                by_dtype[f"{dtype} (oneDNN packed)"] = by_dtype.get(f"{dtype} (oneDNN packed)", 0) + nbytes
    return {"total_bytes": sum(totals.values()), **{f"{k}_bytes": v for k, v in totals.items()},
            "by_dtype_bytes": by_dtype}


def weights_in_worker(worker) -> dict:
    """Run inside each worker by collective_rpc (a callable is sent with cloudpickle, by value)."""
    return loaded_weight_bytes(worker.get_model())


class SharedEngine:
    """Wraps ``LLM.from_engine_args``: equal engine arguments give the same engine."""

    def __init__(self, llm_class):
        self.llm_class = llm_class
        self.original = llm_class.from_engine_args
        self.engine_args = None
        self.llm = None
        self.starts = 0

    def from_engine_args(self, engine_args):
        if self.llm is not None and engine_args == self.engine_args:
            return self.llm
        if self.llm is not None:
            differ = [f.name for f in dataclasses.fields(engine_args)
                      if getattr(engine_args, f.name) != getattr(self.engine_args, f.name)]
            print(f"[session] new engine: engine arguments differ in {differ}", flush=True)
        self.close()
        kept = copy.deepcopy(engine_args)  # building the engine mutates engine_args
        self.llm = self.original(engine_args)
        self.engine_args = kept
        self.starts += 1
        return self.llm

    def close(self) -> None:
        if self.llm is None:
            return
        engine = self.llm.llm_engine
        self.llm = None
        shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
        del engine
        gc.collect()


def run_vllm_cli(argv: list[str]) -> None:
    """`vllm *argv` in this process; a SystemExit with a non-zero code is an error."""
    from vllm.entrypoints.cli.main import main as vllm_main

    saved = sys.argv
    sys.argv = ["vllm", *argv]
    try:
        vllm_main()
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"`vllm {' '.join(argv)}` exited with code {e.code}") from None
    finally:
        sys.argv = saved


def engine_from_cli(argv: list[str], shared: SharedEngine):
    """The (shared) engine for engine arguments given as on the `vllm bench latency` command line."""
    from vllm.benchmarks.latency import add_cli_args
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    return shared.from_engine_args(EngineArgs.from_cli_args(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    session = json.loads(Path(argv[0]).read_text())
    status_path = Path(session["status"])
    status: dict = {"steps": [], "engine_starts": 0, "finished": False}

    def save() -> None:
        tmp = status_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(status, indent=1))
        os.replace(tmp, status_path)

    def step(name: str, fn) -> None:
        entry = {"step": name, "ok": False, "started": time.strftime("%H:%M:%S")}
        status["steps"].append(entry)
        save()
        print(f"[session] step {name}", flush=True)
        t0 = time.perf_counter()
        try:
            fn()
            entry["ok"] = True
        except BaseException as e:  # one failed step must not stop the others
            if isinstance(e, KeyboardInterrupt):
                raise
            entry["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        status["engine_starts"] = shared.starts
        save()

    import numpy as np
    from vllm import LLM

    shared = SharedEngine(LLM)
    LLM.from_engine_args = shared.from_engine_args  # see the module docstring
    seed = int(session.get("seed", 0))
    for cmd in session.get("commands", []):
        def run(cmd=cmd):
            np.random.seed(seed)
            random.seed(seed)
            run_vllm_cli(cmd)
        step(_label(cmd), run)
    memory = session.get("weight_memory")
    if memory:
        def measure() -> None:
            # The engine the benchmarks ran on, if any (same model); else one from engine_args.
            llm = shared.llm or engine_from_cli(memory["engine_args"], shared)
            per_worker = llm.collective_rpc(weights_in_worker)
            Path(memory["out"]).write_text(json.dumps({"workers": per_worker}, indent=1))
        step("weight-memory", measure)
    shared.close()
    status["finished"] = True
    save()
    return 0 if all(s["ok"] for s in status["steps"]) else 1


def _label(cmd: list[str]) -> str:
    """A short name for a bench command: its --output-json file name."""
    if "--output-json" in cmd:
        return Path(cmd[cmd.index("--output-json") + 1]).stem
    return " ".join(cmd[2:6])


if __name__ == "__main__":
    sys.exit(main())
