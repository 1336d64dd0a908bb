"""The two activation streams between blocks: the full-precision model's and the quantized model's.

Each is `[n_windows, seq_len, hidden]`, updated in place block after block (windows are independent, so
a batch of rows is read and its output written back over it). They live in memory, or, when the two
would exceed the memory budget, in memory-mapped files (pages the kernel can write back and drop, so
they never count as anonymous memory). Stored in float32 or bfloat16; blocks always compute in float32.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from offline_tuner.signround import STREAM_DTYPES, run_block

_NUMPY_STORAGE = {torch.float32: np.float32, torch.bfloat16: np.uint16}  # bf16 kept as its raw 16 bits


def default_stream_budget_bytes() -> int:
    """A quarter of the machine's memory."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError):
        return 4 * 2**30


class ActivationStreams:
    def __init__(self, shape: tuple[int, int, int], dtype_name: str, budget_bytes: int, folder: Path,
                 device: torch.device):
        self.dtype = STREAM_DTYPES[dtype_name]
        self.bytes = 2 * math.prod(shape) * self.dtype.itemsize
        self.on_disk = self.bytes > budget_bytes
        self.folder = folder
        self.fp = self._buffer("fp", shape, device)
        self.q = self._buffer("q", shape, device)

    def _buffer(self, name: str, shape, device) -> torch.Tensor:
        if not self.on_disk:
            return torch.empty(shape, dtype=self.dtype, device=device)
        self.folder.mkdir(parents=True, exist_ok=True)
        array = np.memmap(self.folder / f"{name}.bin", dtype=_NUMPY_STORAGE[self.dtype], mode="w+", shape=shape)
        return torch.from_numpy(array).view(self.dtype)

    def describe(self) -> str:
        where = f"memory-mapped files in {self.folder}" if self.on_disk else "memory"
        return f"2 x {list(self.fp.shape)} {str(self.dtype).removeprefix('torch.')} ({self.bytes / 2**30:.2f} GiB) in {where}"

    def close(self) -> None:
        self.fp = self.q = None
        if self.on_disk:
            for name in ("fp", "q"):
                (self.folder / f"{name}.bin").unlink(missing_ok=True)
            self.folder.rmdir()


@torch.no_grad()
def run_block_in_place(block, stream: torch.Tensor, kwargs: dict, batch: int, bf16_autocast: bool = False) -> bool:
    """Replace each row of `stream` by the block's output on it, a batch at a time, computing in float32
    (matmuls in bf16 when asked) on the block's device. Returns whether every output was finite."""
    device = next(block.parameters()).device
    finite = True
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_autocast):
        for i in range(0, stream.shape[0], batch):
            out = run_block(block, stream[i:i + batch].to(device, torch.float32), kwargs).float()
            finite = finite and bool(torch.isfinite(out).all())
            stream[i:i + batch] = out.to(stream.device, stream.dtype)
    return finite
