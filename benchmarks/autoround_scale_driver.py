"""Run PyPI auto-round on a large model with its lowest-memory options, for benchmarks/scale.py.

Runs inside auto-round's own virtual environment and imports nothing from this project. Its options
for memory on a CPU (read in the auto-round 0.16.1 source): the model is passed as a path with
AR_DISK_STREAM_MODEL=1 (an empty model, each block loaded from the checkpoint when its turn comes),
low_cpu_mem_usage=True, no torch.compile, and quantize_and_save in its own format with small shards
(a plain quantize() would keep every block in memory). Round-to-nearest is plain RTN
(disable_opt_rtn=True), which auto-round runs in its model-free streaming mode. The output is deleted.

With --device cuda (benchmarks/gpu_check.py) it tunes on the GPU with its defaults instead (the model in
memory, no disk streaming) and reports the peak GPU memory. --stub-datasets stands in for the `datasets`
package, which `import auto_round` needs but a run on given calibration windows never uses (the GPU
machine has no copy of it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--calibration", help=".pt file: int64 [n_samples, seq_len] token ids (tuning only)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--iters", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--stub-datasets", action="store_true", help="stand in for the unused `datasets` package")
    args = p.parse_args()
    if args.stub_datasets:
        stub_package("datasets")

    work = tempfile.mkdtemp(prefix="autoround-scale-")
    if args.device == "cpu":
        os.environ["AR_DISK_STREAM_MODEL"] = "1"
    os.environ["AR_WORK_SPACE"] = os.path.join(work, "workspace")
    import torch
    from auto_round import AutoRound

    kwargs = {}
    if args.iters == 0:
        kwargs["disable_opt_rtn"] = True
    else:
        windows = torch.load(args.calibration)
        kwargs.update(dataset=[w.unsqueeze(0) for w in windows], nsamples=windows.shape[0], seqlen=windows.shape[1],
                      batch_size=args.batch_size)
    if args.device == "cpu":
        kwargs.update(low_cpu_mem_usage=True, enable_torch_compile=False)
    else:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        rounder = AutoRound(args.model, scheme="W4A16", bits=args.bits, group_size=args.group_size, sym=False,
                            iters=args.iters, device_map=args.device, **kwargs)
        rounder.quantize_and_save(os.path.join(work, "out"), format="auto_round", max_shard_size="500MB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - t0
    print(f"auto-round done in {seconds:.1f} s", flush=True)
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else None
    print("AUTOROUND_RESULT=" + json.dumps({"seconds": seconds, "peak_gpu_bytes": peak}), flush=True)
    return 0


def stub_package(root: str) -> None:
    """Make `import root` and its submodules succeed with empty stand-ins that fail only when used."""
    import importlib.abc
    import importlib.machinery
    import types

    class StandIn(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return StandIn(f"{self.__name__}.{name}")

        def __call__(self, *args, **kwargs):
            raise RuntimeError(f"{self.__name__}: `{root}` is not installed (a stand-in was imported)")

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name == root or name.startswith(root + "."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            module = StandIn(spec.name)
            module.__path__ = []
            return module

        def exec_module(self, module):
            pass

    try:
        __import__(root)
    except ImportError:
        sys.meta_path.insert(0, Finder())


if __name__ == "__main__":
    sys.exit(main())
