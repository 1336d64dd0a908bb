"""Hugging Face sharded safetensors, written tensor by tensor into files laid out in advance.

Every tensor's name, dtype and shape is known before the first byte is written (the tuner's plan
decides them), so each shard's header and each tensor's place are fixed up front: a tensor is
written into its place as soon as it exists and is never held with the others. The same layout gives
the same bytes, so a resumed run rewrites what an interrupted one left unfinished and ends
byte-identical. One shard is `model.safetensors`; more are `model-0000i-of-0000n.safetensors` with
`model.safetensors.index.json`, as transformers and vLLM read them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Iterable, Mapping

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default "5GB"
HEADER_ALIGN = 8

DTYPE_NAMES = {torch.int32: "I32", torch.uint8: "U8", torch.int8: "I8", torch.float16: "F16",
               torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64",
               torch.int16: "I16", torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32",
               torch.uint64: "U64"}
DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> "TensorEntry":
        return cls(name, t.dtype, tuple(t.shape))


def shard_file_names(n: int) -> list[str]:
    return [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def split_into_shards(entries: list[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    """Consecutive groups of tensors of at most max_shard_bytes each (a larger tensor gets a shard alone)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes}: must be positive")
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def _header(entries: list[TensorEntry]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The safetensors header of one file, and each tensor's (begin, end) in the data section."""
    meta: dict[str, object] = {"__metadata__": {"format": "pt"}}
    places, offset = {}, 0
    for e in entries:
        places[e.name] = (offset, offset + e.nbytes)
        meta[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % HEADER_ALIGN)
    return len(text).to_bytes(8, "little") + text, places


class ShardedWriter:
    """Writes the tensors of `entries` into `folder`, in any order, each exactly once per run.

    With `reuse_existing`, files already laid out identically (a resumed run) are kept, with the
    tensors written into them before; anything else is laid out anew.
    """

    def __init__(self, folder: Path, entries: Iterable[TensorEntry], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 reuse_existing: bool = False):
        self.folder = Path(folder)
        self.entries = {e.name: e for e in entries}
        groups = split_into_shards(list(self.entries.values()), max_shard_bytes)
        self.files = [self.folder / n for n in shard_file_names(len(groups))]
        self._place: dict[str, tuple[Path, int]] = {}
        for path, group in zip(self.files, groups):
            header, places = _header(group)
            if not (reuse_existing and _starts_with(path, header, len(header) + sum(e.nbytes for e in group))):
                with open(path, "wb") as f:
                    f.write(header)
                    f.truncate(len(header) + sum(e.nbytes for e in group))
            for name, (begin, _) in places.items():
                self._place[name] = (path, len(header) + begin)
        self._fds: dict[Path, int] = {}
        self.written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        e = self.entries.get(name)
        if e is None:
            raise KeyError(f"{name}: not in this checkpoint's layout")
        if tensor.dtype != e.dtype or tuple(tensor.shape) != e.shape:
            raise ValueError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, the layout has {e.dtype} {e.shape}")
        path, offset = self._place[name]
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_WRONLY)
        data = memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        while len(data):
            n = os.pwrite(fd, data, offset)
            data, offset = data[n:], offset + n
        self.written.add(name)

    def read(self, name: str) -> torch.Tensor:
        """A tensor as written into its shard (by this run or by an interrupted one it resumes)."""
        from safetensors import safe_open

        path, _ = self._place[name]
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)

    def write_all(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            self.write(name, t)

    def sync(self) -> None:
        """Make what was written durable (before recording it as done)."""
        for fd in self._fds.values():
            os.fsync(fd)

    def finish(self) -> None:
        """Check every tensor was written, sync, close, and write the index when there are several shards."""
        missing = sorted(set(self.entries) - self.written)
        if missing:
            raise RuntimeError(f"checkpoint incomplete: {len(missing)} tensors never written, e.g. {missing[:3]}")
        self.sync()
        self.close()
        if len(self.files) > 1:
            index = {"metadata": {"total_size": sum(e.nbytes for e in self.entries.values())},
                     "weight_map": {name: path.name for name, (path, _) in self._place.items()}}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _starts_with(path: Path, header: bytes, size: int) -> bool:
    try:
        if path.stat().st_size != size:
            return False
        with open(path, "rb") as f:
            return f.read(len(header)) == header
    except OSError:
        return False


def write_tensors(folder: Path, tensors: Mapping[str, torch.Tensor],
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """All of `tensors` as (sharded) safetensors in `folder`; returns the files."""
    writer = ShardedWriter(folder, [TensorEntry.of(n, t) for n, t in tensors.items()], max_shard_bytes)
    writer.write_all(tensors)
    writer.finish()
    return writer.files
