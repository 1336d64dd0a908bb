"""What the model itself says about its decoder blocks: where they are and what each is called with.

Nothing here is a per-family table. The decoder blocks are the `nn.ModuleList` whose members are
the model's own unsplittable layer class (transformers' `_no_split_modules`, e.g. `LlamaDecoderLayer`).
What each block is called with (attention mask, rotary embeddings, position ids, ...) is recorded by
letting the model's own forward run with light stand-ins in place of its blocks: each stand-in keeps
its arguments and passes the hidden states on unchanged, so no block weight is touched. Models whose
layers differ by type (Gemma 2/3: sliding-window and global attention, with their own rotary
settings) thus hand each block its own mask and position embeddings, as in the model's forward.
"""
from __future__ import annotations

import dataclasses

import torch

from offline_tuner.errors import TunerInputError

# Keyword arguments of a block call that belong to generation, not to the computation we replay.
_GENERATION_KWARGS = frozenset({"past_key_values", "past_key_value", "use_cache", "output_attentions",
                                "cache_position"})


@dataclasses.dataclass(frozen=True)
class DecoderBlocks:
    path: str  # module path of the ModuleList, e.g. "model.layers"
    blocks: torch.nn.ModuleList

    def module_name(self, index: int) -> str:
        """Module name of block `index`, e.g. "model.layers.3"."""
        return f"{self.path}.{index}"

    def prefix(self, index: int) -> str:
        """Module-name prefix of block `index`, e.g. "model.layers.3."."""
        return f"{self.path}.{index}."

    def __len__(self) -> int:
        return len(self.blocks)


def find_decoder_blocks(model: torch.nn.Module) -> DecoderBlocks:
    """The model's decoder blocks, found from its declared layer class; refused clearly otherwise."""
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    candidates = [(name, mod) for name, mod in model.named_modules()
                  if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0
                  and all(type(m).__name__ in layer_classes for m in mod)]
    if len(candidates) != 1:
        found = [f"{n} ({len(m)} x {type(m[0]).__name__})" for n, m in candidates]
        raise TunerInputError(
            f"{type(model).__name__}: cannot tell which modules are its decoder blocks (declared layer classes "
            f"{sorted(layer_classes) or 'none'}, matching lists: {found or 'none'}); SignRound tuning needs one "
            f"list of decoder blocks. Use --iters 0 (round-to-nearest) for this model")
    path, blocks = candidates[0]
    expected = getattr(model.config, "num_hidden_layers", None)
    if expected is not None and expected != len(blocks):
        raise TunerInputError(f"{type(model).__name__}: {path} holds {len(blocks)} blocks but the config says "
                              f"num_hidden_layers={expected}")
    return DecoderBlocks(path, blocks)


class _StopForward(Exception):
    pass


class _RecordingStandIn(torch.nn.Module):
    """Takes a block's place during one forward: records its call, returns its hidden states."""

    def __init__(self, index: int, record: "_CallRecord", last: bool):
        super().__init__()
        self.index, self.record, self.last = index, record, last

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.record.add(self.index, hidden, args[1:], kwargs)
        if self.last:
            raise _StopForward  # the final norm and head are not needed
        return hidden


class _CallRecord:
    def __init__(self, n_blocks: int):
        self.first_hidden: torch.Tensor | None = None
        self.kwargs: list[dict | None] = [None] * n_blocks
        self.shapes: list[tuple | None] = [None] * n_blocks

    def add(self, index: int, hidden: torch.Tensor, extra_args: tuple, kwargs: dict) -> None:
        if extra_args:
            raise TunerInputError(f"decoder block {index} is called with {len(extra_args)} positional arguments "
                                  f"after the hidden states; only keyword arguments can be replayed")
        if index == 0:
            self.first_hidden = hidden
        self.shapes[index] = tuple(hidden.shape)
        self.kwargs[index] = {k: v for k, v in kwargs.items() if k not in _GENERATION_KWARGS}


@dataclasses.dataclass
class BlockCalls:
    """Inputs of block 0 for every calibration window, and each block's keyword arguments.

    Keyword arguments were recorded on one window (batch 1): masks and rotary tables broadcast over
    a batch of windows of the same length. Tensors shared by several blocks (one mask per layer type)
    are shared here too.
    """

    first_inputs: torch.Tensor  # [n_windows, seq, hidden]
    block_kwargs: list[dict]  # per block


@torch.no_grad()
def record_block_calls(model: torch.nn.Module, blocks: DecoderBlocks, windows: torch.Tensor,
                       device: torch.device, first_inputs: torch.Tensor | None = None) -> BlockCalls:
    """Run the model's forward on each window with stand-ins for its blocks (see module doc).

    Block 0's inputs are written into `first_inputs` ([n_windows, seq, hidden], any float dtype, for
    example a memory-mapped stream) when given, else into a new float32 tensor on `device`.
    """
    n = len(blocks)
    originals = list(blocks.blocks)
    kwargs: list[dict] = []
    try:
        for w, row in enumerate(windows):
            record = _CallRecord(n)
            for i in range(n):
                blocks.blocks[i] = _RecordingStandIn(i, record, last=i == n - 1)
            try:
                model(input_ids=row[None].to(_input_device(model)), use_cache=False)
            except _StopForward:
                pass
            missing = [i for i, k in enumerate(record.kwargs) if k is None]
            if missing:
                raise TunerInputError(f"{type(model).__name__}: the forward pass did not call decoder blocks "
                                      f"{missing[:5]}; SignRound tuning needs every block on the main path")
            if len(set(record.shapes)) != 1:
                raise TunerInputError(f"{type(model).__name__}: hidden states change shape between decoder blocks "
                                      f"({sorted(set(record.shapes))}); the blocks' outputs cannot be replayed")
            if first_inputs is None:
                first_inputs = torch.empty((len(windows), *record.first_hidden.shape[1:]), dtype=torch.float32,
                                           device=device)
            first_inputs[w] = record.first_hidden[0].to(first_inputs.device, first_inputs.dtype)
            if w == 0:
                moved: dict[int, object] = {}  # one copy of each tensor shared between blocks
                kwargs = [{k: _to_device(v, device, moved) for k, v in kw.items()} for kw in record.kwargs]
    finally:
        for i, block in enumerate(originals):
            blocks.blocks[i] = block
    return BlockCalls(first_inputs, kwargs)


def _input_device(model: torch.nn.Module) -> torch.device:
    emb = model.get_input_embeddings()
    return emb.weight.device if emb is not None else torch.device("cpu")


def _to_device(v, device: torch.device, moved: dict):
    if isinstance(v, torch.Tensor):
        if id(v) not in moved:
            moved[id(v)] = v.to(device=device, dtype=torch.float32 if v.is_floating_point() else v.dtype)
        return moved[id(v)]
    if isinstance(v, (tuple, list)):
        return type(v)(_to_device(x, device, moved) for x in v)
    if isinstance(v, dict):
        return {k: _to_device(x, device, moved) for k, x in v.items()}
    return v
