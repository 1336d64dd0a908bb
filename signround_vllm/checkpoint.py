"""Reading and writing SignRound checkpoint folders (torch + safetensors only).

A checkpoint is a complete transformers model folder: ``config.json`` with a
``quantization_config`` (see :mod:`signround_vllm.format`), one or more
``*.safetensors`` files holding packed layers and the unquantized rest, and the
tokenizer and generation-config files of the source model.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open

from signround_vllm.format import (
    QWEIGHT, QZEROS, SCALES, WORD_BITS, PackedLinear, SignRoundConfig, SignRoundFormatError,
    dequantize_packed, validate_layer_tensors,
)
from signround_vllm.shards import DEFAULT_MAX_SHARD_BYTES, DTYPES_BY_NAME, write_tensors

CONFIG_FILE = "config.json"
# Files copied from the source model folder when present.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
              "generation_config.json")


def read_config(ckpt_dir: str | os.PathLike) -> dict:
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.is_file():
        raise SignRoundFormatError(f"{path}: not found; a checkpoint folder needs {CONFIG_FILE}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SignRoundFormatError(f"{path}: not valid JSON ({e})") from None


def read_quant_config(ckpt_dir: str | os.PathLike) -> SignRoundConfig:
    config = read_config(ckpt_dir)
    if "quantization_config" not in config:
        raise SignRoundFormatError(f"{Path(ckpt_dir) / CONFIG_FILE}: no quantization_config; "
                                   f"this is not a quantized checkpoint")
    try:
        return SignRoundConfig.from_dict(config["quantization_config"])
    except SignRoundFormatError as e:
        raise SignRoundFormatError(f"{Path(ckpt_dir) / CONFIG_FILE}: {e}") from None


def weight_files(ckpt_dir: str | os.PathLike) -> list[Path]:
    files = sorted(Path(ckpt_dir).glob("*.safetensors"))
    if not files:
        raise SignRoundFormatError(f"{ckpt_dir}: no *.safetensors files")
    return files


def load_tensors(ckpt_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a folder, by name, from every safetensors file."""
    out: dict[str, torch.Tensor] = {}
    for f in weight_files(ckpt_dir):
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    if name in out:
                        raise SignRoundFormatError(f"{f}: tensor {name} also appears in another file")
                    out[name] = st.get_tensor(name)
        except SignRoundFormatError:
            raise
        except Exception as e:  # safetensors raises its own types for truncated/corrupt files
            raise SignRoundFormatError(f"{f}: cannot be read as safetensors ({e})") from None
    return out


def read_tensor_headers(ckpt_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor's shape and dtype, as meta tensors, from the safetensors headers (no data read).

    Opening a file checks that it is complete: a truncated or corrupt file is refused here.
    """
    out: dict[str, torch.Tensor] = {}
    for f in weight_files(ckpt_dir):
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    sl = st.get_slice(name)
                    dtype = DTYPES_BY_NAME.get(sl.get_dtype())
                    if dtype is None:
                        raise SignRoundFormatError(f"{f}: tensor {name} has unsupported dtype {sl.get_dtype()}")
                    if name in out:
                        raise SignRoundFormatError(f"{f}: tensor {name} also appears in another file")
                    out[name] = torch.empty(sl.get_shape(), dtype=dtype, device="meta")
        except SignRoundFormatError:
            raise
        except Exception as e:  # safetensors' own error types for truncated or corrupt files
            raise SignRoundFormatError(f"{f}: not a complete safetensors file ({e}); copy it again") from None
    return out


def validate_checkpoint(ckpt_dir: str | os.PathLike) -> tuple[SignRoundConfig, dict[str, PackedLinear]]:
    """Check config and every packed layer's tensors against each other, reading headers only.

    Raises SignRoundFormatError naming the file, tensor or layer, what was found and what was expected.
    """
    config = read_quant_config(ckpt_dir)
    layers, _ = split_packed_layers(read_tensor_headers(ckpt_dir), config, str(ckpt_dir))
    return config, layers


def split_packed_layers(tensors: Mapping[str, torch.Tensor], config: SignRoundConfig,
                        source: str = "checkpoint") -> tuple[dict[str, PackedLinear], dict[str, torch.Tensor]]:
    """Group tensors into validated packed layers (by module name) and the remaining tensors."""
    prefixes = sorted(name[: -len(QWEIGHT) - 1] for name in tensors if name.endswith("." + QWEIGHT))
    known = set(prefixes)
    orphans = sorted(n for n in tensors for suffix in (SCALES, QZEROS)
                     if n.endswith("." + suffix) and n[: -len(suffix) - 1] not in known)
    if orphans:
        raise SignRoundFormatError(f"{source}: {orphans[:5]} have no matching .{QWEIGHT} tensor; the checkpoint "
                                   f"is incomplete or mixes formats")
    layers: dict[str, PackedLinear] = {}
    used: set[str] = set()
    for prefix in prefixes:
        spec = config.spec_for(prefix)
        if spec is None:
            raise SignRoundFormatError(f"{source}: {prefix} is stored quantized but quantization_config "
                                       f"lists it in modules_to_not_convert")
        found = {suffix: tensors[f"{prefix}.{suffix}"] for suffix in (QWEIGHT, SCALES, QZEROS)
                 if f"{prefix}.{suffix}" in tensors}
        qweight = found[QWEIGHT]
        if qweight.dim() != 2 or qweight.shape[0] % spec.bits:
            raise SignRoundFormatError(
                f"{source}: {prefix}.{QWEIGHT} has shape {tuple(qweight.shape)}; for {spec.bits} bits "
                f"expected [in_features * {spec.bits} // 32, out_features]")
        in_features = qweight.shape[0] * WORD_BITS // spec.bits
        try:
            validate_layer_tensors(prefix, found, spec, in_features, qweight.shape[1])
        except SignRoundFormatError as e:
            raise SignRoundFormatError(f"{source}: {e}") from None
        layers[prefix] = PackedLinear(qweight=qweight, scales=found[SCALES], qzeros=found.get(QZEROS), spec=spec)
        used.update(f"{prefix}.{s}" for s in found)
        if f"{prefix}.weight" in tensors:
            raise SignRoundFormatError(f"{source}: {prefix} has both a packed {prefix}.{QWEIGHT} and a plain "
                                       f"{prefix}.weight; a layer is stored one way or the other")
    rest = {k: v for k, v in tensors.items() if k not in used}
    return layers, rest


def dequantized_state_dict(ckpt_dir: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The checkpoint as a plain state dict, quantized layers dequantized to `dtype`."""
    config = read_quant_config(ckpt_dir)
    layers, rest = split_packed_layers(load_tensors(ckpt_dir), config, str(ckpt_dir))
    state = dict(rest)
    for prefix, packed in layers.items():
        state[f"{prefix}.weight"] = dequantize_packed(packed, dtype)
    return state


def write_file_atomically(path: Path, content: bytes | str) -> None:
    """Write a file so that a kill leaves the old one or the new one, never a truncated one (a private
    temporary sibling, renamed over `path`); str is written as UTF-8."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content.encode("utf-8") if isinstance(content, str) else content)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _fresh_temp_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_siblings(final)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-{os.getpid()}-", dir=final.parent))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_abandoned_siblings(final: Path) -> None:
    """Temporary folders of writers that were killed before they could clean up (their PID is gone)."""
    for kind in ("partial", "old"):
        prefix = f".{final.name}.{kind}-"
        for p in final.parent.glob(prefix + "*"):
            pid = p.name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)


def _exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def commit_folder(tmp: Path, final: Path, overwrite: bool) -> None:
    """Move a finished folder into place. An existing one (if allowed) is swapped out in one step
    where the OS can (Linux), so a reader or a killed writer never sees the path missing."""
    if final.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{final} already exists; choose another output folder or pass --overwrite")
        if _exchange_paths(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the old folder
            return
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_folder_files(folder: Path, config: dict, source_dir: str | os.PathLike | None = None,
                       extra_json: Mapping[str, dict] | None = None) -> None:
    """config.json, the tokenizer and generation files of `source_dir` (when present), and `extra_json`."""
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if source_dir is not None:
        for name in SIDE_FILES:
            src = Path(source_dir) / name
            if src.is_file():
                shutil.copy2(src, folder / name)
    for name, content in (extra_json or {}).items():
        (folder / name).write_text(json.dumps(content, indent=2) + "\n")


def write_model_folder(out_dir: str | os.PathLike, tensors: Mapping[str, torch.Tensor], config: dict,
                       source_dir: str | os.PathLike | None = None, overwrite: bool = False,
                       extra_json: Mapping[str, dict] | None = None,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write a model folder atomically: a temporary sibling folder renamed into place.

    `config` is the full config.json content. Weights are sharded beyond `max_shard_bytes`; see
    `write_folder_files` for the rest.
    """
    final = Path(out_dir)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; choose another output folder or pass --overwrite")
    tmp = _fresh_temp_dir(final)
    try:
        write_tensors(tmp, tensors, max_shard_bytes)
        write_folder_files(tmp, config, source_dir, extra_json)
        commit_folder(tmp, final, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_dequantized_copy(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike,
                           dtype: torch.dtype = torch.bfloat16, overwrite: bool = False) -> Path:
    """A plain (unquantized) model folder holding the checkpoint's dequantized weights."""
    config = read_config(ckpt_dir)
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    return write_model_folder(out_dir, dequantized_state_dict(ckpt_dir, dtype), config,
                              source_dir=ckpt_dir, overwrite=overwrite)
