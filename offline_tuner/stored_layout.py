"""Where each parameter of the model lives in its files.

transformers 5 renames and fuses some families' weights while loading them: Mixtral's stored
`block_sparse_moe.experts.3.w1.weight` becomes rows of the in-memory `mlp.experts.gate_up_proj`
([experts, 2 x intermediate, hidden]). The checkpoint we write keeps the stored names, which are the
names vLLM's model loaders expect. The map is not a per-family table: it comes from transformers' own
conversion rules, run backwards as `save_pretrained` runs them, on stand-in tensors that hold row
numbers instead of weights. Each stored tensor's values then say which rows of which parameter it holds.
"""
from __future__ import annotations

import bisect
import dataclasses

import torch

from offline_tuner.errors import TunerInputError


@dataclasses.dataclass(frozen=True)
class StoredPiece:
    """Rows [start, stop) of an in-memory parameter, stored as one tensor of the files.

    Rows count along all but the last dimension (a [E, N, K] parameter has E * N rows of K values);
    a 1-D parameter's rows are its elements.
    """

    stored: str  # tensor name in the files, e.g. "model.layers.0.block_sparse_moe.experts.3.w1.weight"
    param: str  # in-memory parameter, e.g. "model.layers.0.mlp.experts.gate_up_proj"
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclasses.dataclass(frozen=True)
class StoredLayout:
    pieces: dict[str, list[StoredPiece]]  # in-memory parameter -> its pieces, in row order

    def stored_names(self) -> list[str]:
        return [p.stored for pieces in self.pieces.values() for p in pieces]


def row_count(shape: torch.Size | tuple[int, ...]) -> int:
    return int(torch.Size(shape[:-1]).numel()) if len(shape) >= 2 else int(torch.Size(shape).numel())


def stored_layout(model: torch.nn.Module, names: list[str]) -> StoredLayout:
    """The stored pieces of the parameters and buffers `names` (state-dict names of `model`, which may be
    on the meta device). Refused clearly when the stored form is not rows of the in-memory one."""
    from transformers.core_model_loading import revert_weight_conversion

    state = model.state_dict(keep_vars=True)
    starts, tags, offset = [], {}, 0
    for name in names:
        shape = tuple(state[name].shape)
        rows = row_count(shape)
        tag_shape = (*shape[:-1], 1) if len(shape) >= 2 else shape
        tags[name] = torch.arange(offset, offset + rows, dtype=torch.float64).reshape(tag_shape)
        starts.append(offset)
        offset += rows
    try:
        stored = revert_weight_conversion(model, dict(tags))
    except Exception as e:  # transformers' conversion machinery has no error type of its own
        raise TunerInputError(f"{type(model).__name__}: cannot work out how its weights are stored "
                              f"(transformers' conversion rules failed on them: {e})") from None
    pieces: dict[str, list[StoredPiece]] = {name: [] for name in names}
    for stored_name, tag in stored.items():
        ids = tag.reshape(-1).to(torch.int64)
        if ids.numel() == 0:
            continue
        first = int(ids[0])
        owner = bisect.bisect_right(starts, first) - 1
        param = names[owner]
        start = first - starts[owner]
        piece = StoredPiece(stored_name, param, start, start + ids.numel())
        contiguous = torch.equal(ids, torch.arange(first, first + ids.numel()))
        if not contiguous or piece.stop > row_count(state[param].shape):
            raise TunerInputError(f"{type(model).__name__}: the stored tensor {stored_name} is not a run of rows of "
                                  f"the in-memory parameter {param} (for example it is stored transposed); this "
                                  f"model's stored layout is not supported")
        pieces[param].append(piece)
    for param, ps in pieces.items():
        ps.sort(key=lambda p: p.start)
        covered = 0
        for p in ps:
            if p.start != covered:
                break
            covered = p.stop
        if covered != row_count(state[param].shape):
            raise TunerInputError(f"{type(model).__name__}: the stored tensors {[p.stored for p in ps][:4]} do not "
                                  f"cover the parameter {param} exactly once; this model's stored layout is not "
                                  f"supported")
    return StoredLayout(pieces)
