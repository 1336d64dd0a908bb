"""Run PyPI auto-round on a large model with its lowest-memory options, for benchmarks/scale.py.

Runs inside auto-round's own virtual environment and imports nothing from this project. Its options
for memory on a CPU (read in the auto-round 0.16.1 source): the model is passed as a path with
AR_DISK_STREAM_MODEL=1 (an empty model, each block loaded from the checkpoint when its turn comes),
low_cpu_mem_usage=True, no torch.compile, and quantize_and_save in its own format with small shards
(a plain quantize() would keep every block in memory). Round-to-nearest is plain RTN
(disable_opt_rtn=True), which auto-round runs in its model-free streaming mode. The output is deleted.
"""
from __future__ import annotations

import argparse
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
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix="autoround-scale-")
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
    t0 = time.perf_counter()
    try:
        rounder = AutoRound(args.model, scheme="W4A16", bits=args.bits, group_size=args.group_size, sym=False,
                            iters=args.iters, device_map="cpu", low_cpu_mem_usage=True, enable_torch_compile=False,
                            **kwargs)
        rounder.quantize_and_save(os.path.join(work, "out"), format="auto_round", max_shard_size="500MB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"auto-round done in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
