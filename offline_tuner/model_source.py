"""A model as users have it, read piece by piece: a folder or a cached hub id, one or many safetensors files.

The model is built on the meta device (parameters take no memory; buffers such as rotary tables are
real, as transformers computes them from the config). Weights are read from the memory-mapped
safetensors files when a stage needs them (`materialize`) and given back (`release`), so the
whole model is never in memory at once.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from signround_vllm.shards import DTYPES_BY_NAME
from offline_tuner.errors import TunerInputError
from offline_tuner.stored_layout import StoredLayout, stored_layout

INDEX_FILE = "model.safetensors.index.json"
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclasses.dataclass
class ModelSource:
    path: Path
    hf_config: object  # transformers PretrainedConfig
    files: dict[str, Path]  # tensor name -> safetensors file holding it
    layout: StoredLayout | None = None  # set by check_names: where each parameter is stored
    _handles: dict[Path, object] = dataclasses.field(default_factory=dict, repr=False)

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def read(self, name: str) -> torch.Tensor:
        """One tensor, in its stored dtype, refused if not finite."""
        if name not in self.files:
            raise TunerInputError(f"{self.path}: the weights hold no tensor {name!r}, which the model needs")
        t = self._handle(self.files[name]).get_tensor(name)  # backed by the mapped file, no copy
        if t.is_floating_point() and not _all_finite(t):
            raise TunerInputError(f"weight {name} contains NaN or Inf; the model cannot be quantized")
        return t

    def tensor_names(self) -> list[str]:
        return list(self.files)

    def shape_of(self, name: str) -> tuple[int, ...]:
        """The stored shape of a tensor (read from the header)."""
        return tuple(self._handle(self.files[name]).get_slice(name).get_shape())

    def dtype_of(self, name: str) -> torch.dtype:
        """The stored dtype of a tensor (read from the header)."""
        stored = self._handle(self.files[name]).get_slice(name).get_dtype()
        if stored not in DTYPES_BY_NAME:
            raise TunerInputError(f"{self.files[name]}: tensor {name} has dtype {stored}, which this tool cannot read")
        return DTYPES_BY_NAME[stored]

    def empty_model(self) -> torch.nn.Module:
        """The model with every parameter on the meta device (no weight memory) and real buffers."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        dtype = weights_dtype(self)
        try:
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(self.hf_config, dtype=dtype)
        except ValueError as e:
            raise TunerInputError(f"{self.path}: cannot be loaded as a causal language model ({e})") from None
        model.eval().requires_grad_(False)
        return model

    def check_names(self, model: torch.nn.Module) -> StoredLayout:
        """Find every tensor the model holds in the files, under its own name or, for families that
        transformers renames or fuses while loading, under its stored name(s); refuse what is missing or
        does not fit. Sets and returns `self.layout`."""
        layout = model_stored_layout(model)
        names = list(layout.pieces)
        missing = sorted(p.stored for n in names for p in layout.pieces[n]
                         if p.stored not in self.files and not _is_buffer(model, n))
        if missing:
            raise TunerInputError(f"{self.path}: the weights lack {len(missing)} tensors the model needs, e.g. "
                                  f"{missing[:3]}; the files are incomplete or store them under other names")
        state = model.state_dict(keep_vars=True)
        for name in names:
            width = state[name].shape[-1] if state[name].dim() >= 2 else 1
            for p in layout.pieces[name]:
                if p.stored not in self.files:
                    continue
                shape = self.shape_of(p.stored)
                fits = (int(torch.Size(shape).numel()) == p.rows * width
                        and (state[name].dim() < 2 or (len(shape) >= 2 and shape[-1] == width)))
                if not fits:
                    raise TunerInputError(f"{self.files[p.stored].name}: tensor {p.stored} has shape {list(shape)}, "
                                          f"which does not fit the model's {name} {list(state[name].shape)} "
                                          f"({p.rows} rows of {width}); the files do not match config.json")
        self.layout = layout
        return layout

    def read_param(self, name: str, model: torch.nn.Module) -> torch.Tensor:
        """An in-memory parameter, assembled from its stored pieces (read as is when stored whole)."""
        if self.layout is None:
            self.check_names(model)
        pieces = self.layout.pieces[name]
        shape = model.get_parameter(name).shape
        if len(pieces) == 1:
            return self.read(pieces[0].stored).reshape(shape)
        rows = [self.read(p.stored).reshape(p.rows, -1) for p in pieces]  # in row order, covering every row
        return torch.cat(rows).reshape(shape)

    def materialize(self, model: torch.nn.Module, names: list[str]) -> None:
        """Read the parameters `names` (full dotted names) from the files into the model."""
        tied = tied_parameter_names(model)
        for name in names:
            param = model.get_parameter(name)
            value = self.read_param(name if name not in tied else input_embedding_param(model), model)
            _set_parameter(model, name, value.to(param.dtype))

    def materialize_module(self, model: torch.nn.Module, module_name: str) -> torch.nn.Module:
        """Read one module's parameters (its children's too) from the files; returns the module."""
        module = model.get_submodule(module_name)
        self.materialize(model, [f"{module_name}.{n}" for n, _ in module.named_parameters()])
        return module

    def close(self) -> None:
        self._handles.clear()


def _all_finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """Checked a slice at a time: a whole-tensor check would allocate several times the tensor."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def release(model: torch.nn.Module, names: list[str]) -> None:
    """Give back the memory of the parameters `names` (they return to the meta device)."""
    for name in names:
        _set_parameter(model, name, torch.empty_like(model.get_parameter(name), device="meta"))


def _set_parameter(module: torch.nn.Module, dotted: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = dotted.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)


def tied_parameter_names(model) -> set[str]:
    """Parameter names that share storage with another (tied embeddings): stored once, under the other name."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    out = output_embedding_param(model)
    return {out} if out is not None else set()


def model_stored_layout(model) -> StoredLayout:
    """Where each of the model's parameters and buffers is stored (tied ones are stored once, elsewhere)."""
    tied = tied_parameter_names(model)
    return stored_layout(model, [n for n in model.state_dict() if n not in tied])


def input_embedding_param(model) -> str:
    emb = model.get_input_embeddings()
    return next(n + ".weight" for n, m in model.named_modules() if m is emb)


def output_embedding_param(model) -> str | None:
    """The output layer's (lm_head's) weight name, or None where the model has none."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((n + ".weight" for n, m in model.named_modules() if m is out), None) if out is not None else None


def _is_buffer(model, name: str) -> bool:
    return name in dict(model.named_buffers())


def weights_dtype(source: ModelSource) -> torch.dtype:
    """The floating dtype the model's weights are stored in; refused unless bf16, fp16 or fp32."""
    floating = {d for d in (source.dtype_of(n) for n in source.files) if d.is_floating_point}
    if not floating or not floating <= set(SUPPORTED_DTYPES):
        raise TunerInputError(f"{source.path}: weights stored as {sorted(map(str, floating))}; the tuner reads "
                              f"bf16, fp16 or fp32 models")
    return max(floating, key=lambda d: torch.finfo(d).bits)


def resolve_model_path(ref: str | os.PathLike) -> Path:
    """A local folder, or a hub model id already in the local Hugging Face cache (never downloaded)."""
    path = Path(ref)
    if path.is_dir():
        return path
    text = str(ref)
    if path.exists() or text.count("/") != 1 or text.startswith((".", "/")):
        raise TunerInputError(f"{ref}: not a model folder; give a local transformers model folder or a hub id "
                              f"(org/name) already in the local Hugging Face cache")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError) as e:
        raise TunerInputError(f"{ref}: not a local folder, and not in the local Hugging Face cache "
                              f"({type(e).__name__}); nothing is downloaded: fetch it first, for example with "
                              f"`huggingface-cli download {text}`, or give a folder") from None


def open_model(ref: str | os.PathLike) -> ModelSource:
    """Open a model for quantization; refuses bad folders with one clear message, reading headers only."""
    from transformers import AutoConfig

    path = resolve_model_path(ref)
    if not (path / "config.json").is_file():
        raise TunerInputError(f"{path}: not a model folder (no config.json); give a local transformers "
                              f"model folder, e.g. the output of `signround model prepare`")
    try:
        hf_config = AutoConfig.from_pretrained(path)  # trust_remote_code stays off
    except (ValueError, OSError, KeyError) as e:
        raise TunerInputError(f"{path}: config.json cannot be read as a transformers model config ({e})") from None
    from transformers import AutoModelForCausalLM

    if type(hf_config) not in AutoModelForCausalLM._model_mapping:
        raise TunerInputError(f"{path}: cannot be loaded as a causal language model (transformers has no causal "
                              f"LM class for model_type {getattr(hf_config, 'model_type', '?')!r})")
    if getattr(hf_config, "quantization_config", None) is not None:
        qc = hf_config.quantization_config
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else getattr(qc, "quant_method", "?")
        raise TunerInputError(f"{path}: the model is already quantized ({method}); give an unquantized model")
    return ModelSource(path, hf_config, _tensor_files(path))


def _tensor_files(path: Path) -> dict[str, Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise TunerInputError(f"{index}: not a valid safetensors index ({e})") from None
        files = {name: path / f for name, f in weight_map.items()}
        absent = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if absent:
            raise TunerInputError(f"{index} names shards that are missing: {absent[:3]}")
    else:
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            others = sorted(p.name for p in path.glob("*.bin"))[:2]
            hint = f" (found {others}: convert them to safetensors first)" if others else ""
            raise TunerInputError(f"{path}: the model's weights cannot be read: no *.safetensors files{hint}")
        files = {}
        for f in shards:
            for name in _keys(f):
                files[name] = f
    for f in sorted(set(files.values())):
        _keys(f)  # opens every file once: a truncated or corrupt one is refused here
    return files


def _keys(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="pt") as st:
            return list(st.keys())
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise TunerInputError(f"{file}: the model's weights cannot be read ({e})") from None
