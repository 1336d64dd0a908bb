"""Export a SignRound checkpoint to the compressed-tensors, GPTQ or AWQ layouts vLLM's built-in methods load.

Nothing is requantized: the exported checkpoint holds the same integers ``q``, the
same zero points and the same float16 scales as the SignRound checkpoint, only
repacked. Settings a format cannot hold are refused with :class:`ExportError`.

What vLLM 0.32 accepts (read from its source, ``vllm/model_executor/layers/quantization``):

GPTQ (``quant_method: "gptq"`` -> ``AutoGPTQConfig`` in ``auto_gptq.py``)
  - ``TYPE_MAP = {(4, True): uint4b8, (8, True): uint8b128}``: symmetric 4- and 8-bit only;
    ``__init__`` and ``gptq_utils.override_config`` raise for anything else.
    ``uint4b8`` means ``w = (q - 8) * s``: SignRound's symmetric convention (implied zero point
    ``2^(b-1)``) with the same integers.
  - ``AutoGPTQLinearMethod`` builds its kernel with ``zero_points=False``: stored ``qzeros`` are
    loaded (they must be present) but never read, so asymmetric layers cannot be expressed, and
    there is no v1/v2 zero-point switch (``checkpoint_format`` is not read). We store the v1
    convention (zero point minus one) that other GPTQ loaders expect.
  - ``desc_act`` must be false unless ``group_size == -1``
    (``gptq_utils.normalize_and_validate_gptq_desc_act``); we write false and an identity ``g_idx``.
  - group sizes -1, 32, 64, 128 (``verify_marlin_supported``: ``MARLIN_SUPPORTED_GROUP_SIZES``).
  - per-module settings: ``dynamic`` maps a regex (``+:`` override, ``-:`` leave unquantized) to
    ``bits`` / ``group_size`` / ``sym`` / ``desc_act``, matched with ``re.match`` against vLLM's
    module names, where q/k/v and gate/up are already fused (``qkv_proj``, ``gate_up_proj``).
  - on CPU only ``uint4b8`` (``marlin_utils._query_cpu_marlin_supported_quant_types``), served by
    ``CPUWNA16LinearKernel``; 8-bit GPTQ layers load on CUDA (Marlin) only.

AWQ (``quant_method: "awq"`` -> ``AutoAWQConfig`` in ``auto_awq.py``)
  - ``TYPE_MAP = {4: uint4}``: 4-bit only, one bit width and group size for the whole model
    (no per-module mechanism besides ``modules_to_not_convert``, matched as substrings).
  - ``uint4`` with explicit zero points: ``w = (q - z) * s``. Symmetric SignRound layers are
    exported with their implied zero point ``8`` stored explicitly, so ``zero_point`` is always true
    (with ``zero_point: false`` vLLM computes ``w = q * s``).
  - group sizes -1, 32, 64, 128 (Marlin on CUDA; the CPU path takes any even size).
  - on CPU ``AutoAWQMarlinLinearMethod`` repacks to the GPTQ order and uses ``CPUWNA16LinearKernel``.

compressed-tensors (``quant_method: "compressed-tensors"``, ``format: "pack-quantized"`` ->
``CompressedTensorsWNA16`` in ``compressed_tensors/schemes/compressed_tensors_wNa16.py``)
  - 2 to 8 bits, symmetric (``uint{b}b{2^(b-1)}``) or asymmetric with zero points (``uint{b}``),
    strategy ``group`` or ``channel``: every SignRound setting. Kernels on CUDA: Machete or Marlin at 4
    and 8 bits, Humming at 2 and 3 bits (when installed); on CPU: CPUWNA16 at 4 bits only.
  - per-layer settings as separate ``config_groups``: the most common setting targets ``Linear``, the
    others list their modules as anchored ``re:`` targets (vLLM prefers a name match to a class match);
    unquantized linear layers are listed in ``ignore``.
  - the tensors are those of ``signround_vllm.layouts.to_compressed_tensors`` (dense bit streams, the
    layout of compressed-tensors 0.18 and newer, which vLLM 0.32 declares), plus ``weight_shape``;
    scales stay float16 (what the checkpoint holds), so decompression gives our weights bit for bit.

Scales may be negative (SignRound's symmetric full range): every format only multiplies by them.

Layouts written, for a layer with weight ``[N, K]``, ``b`` bits, group size ``G``:

GPTQ (v1, ``checkpoint_format: "gptq"``), ``p = 32 // b`` integers per int32 word:
  ``qweight`` int32 ``[K/p, N]``: integer ``i`` of word ``[r, n]`` is ``q[r*p + i, n]`` at bits
  ``[i*b, i*b + b)``; ``qzeros`` int32 ``[K/G, N/p]``: ``z - 1`` (``z = 2^(b-1)``) packed the same way
  along N; ``scales`` float16 ``[K/G, N]``; ``g_idx`` int32 ``[K]`` = ``k // G``.
AWQ (``version: "gemm"``), 4-bit:
  ``qweight`` int32 ``[K, N/8]``: slot ``j`` (bits ``[4j, 4j + 4)``) of word ``[k, c]`` holds
  ``q[k, 8c + AWQ_PACK_ORDER[j]]``; ``qzeros`` int32 ``[K/G, N/8]``: the zero points ``z``, packed the
  same way; ``scales`` float16 ``[K/G, N]``.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Mapping

import torch

from signround_vllm.checkpoint import (
    load_tensors, read_config, read_quant_config, split_packed_layers, write_model_folder,
)
from signround_vllm.format import LayerQuantSpec, PackedLinear, SignRoundConfig, unpack_int_weights
from signround_vllm.layouts import to_compressed_tensors
from offline_tuner.events import Progress



class ExportError(ValueError):
    """A SignRound checkpoint cannot be written in the requested export format."""


COMPRESSED_TENSORS = "compressed-tensors"
FORMATS = (COMPRESSED_TENSORS, "gptq", "awq")
CT_LAYOUT_VERSION = "0.18.0"  # dense packing: the first compressed-tensors release with this layout
VLLM = "vLLM 0.32"
EXPORT_GROUP_SIZES = (-1, 32, 64, 128)  # marlin_utils.MARLIN_SUPPORTED_GROUP_SIZES
GPTQ_BITS = (4, 8)  # AutoGPTQConfig.TYPE_MAP, symmetric only
AWQ_BITS = (4,)  # AutoAWQConfig.TYPE_MAP
# AWQ word slot j (bits [4j, 4j + 4)) holds column AWQ_PACK_ORDER[j] of its run of 8 columns.
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# vLLM fuses these checkpoint modules into one layer (packed_modules_mapping of Llama-like models),
# and matches GPTQ `dynamic` rules and AWQ skips against the fused name.
FUSED_SHARDS = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
EXPORT_INFO_FILE = "signround_export.json"
# vLLM quantizes its ParallelLMHead only when the config's `lm_head` flag says so (both formats).
LM_HEAD = "lm_head"


# ----------------------------------------------------------------------------
# Integer packing into int32 words
# ----------------------------------------------------------------------------
def _words_to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 with the same bits."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def pack_cols(q: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Integers q [R, C] in [0, 2^bits) -> int32 [R, C * bits // 32], packed along C.

    Slot j (bits [j*bits, j*bits + bits)) of word c holds column c*p + order[j], p = 32 // bits;
    order defaults to the identity.
    """
    p = 32 // bits
    rows, cols = q.shape
    if cols % p:
        raise ExportError(f"cannot pack {cols} columns {p} per int32 word")
    runs = q.to(torch.int64).reshape(rows, cols // p, p)
    if order is not None:
        runs = runs[:, :, list(order)]
    shifts = torch.arange(p, dtype=torch.int64) * bits
    return _words_to_int32((runs << shifts).sum(dim=-1))


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers q [R, C] in [0, 2^bits) -> int32 [R * bits // 32, C], packed along R (GPTQ qweight)."""
    return pack_cols(q.t(), bits).t().contiguous()


# ----------------------------------------------------------------------------
# What each format holds
# ----------------------------------------------------------------------------
def describe_spec(spec: LayerQuantSpec) -> str:
    kind = "symmetric" if spec.sym else "asymmetric"
    group = "per channel" if spec.group_size == -1 else f"group size {spec.group_size}"
    return f"{spec.bits}-bit {kind}, {group} ({spec.short_name()})"


def gptq_refusal(spec: LayerQuantSpec, out_features: int) -> str | None:
    """Why GPTQ in vLLM 0.32 cannot hold a layer with this spec, or None if it can."""
    if spec.bits not in GPTQ_BITS or not spec.sym:
        return (f"GPTQ in {VLLM} holds symmetric 4- and 8-bit layers only; this is "
                f"{describe_spec(spec)}")
    if spec.group_size not in EXPORT_GROUP_SIZES:
        return f"GPTQ in {VLLM} takes group sizes {list(EXPORT_GROUP_SIZES)}; this is {describe_spec(spec)}"
    p = 32 // spec.bits
    if out_features % p:
        return (f"GPTQ packs {p} zero points per int32 word along the output dim, so out_features must be "
                f"a multiple of {p} at {spec.bits} bits; this layer has out_features={out_features}")
    return None


def awq_refusal(spec: LayerQuantSpec, out_features: int) -> str | None:
    """Why AWQ in vLLM 0.32 cannot hold a layer with this spec, or None if it can."""
    if spec.bits not in AWQ_BITS:
        return (f"AWQ in {VLLM} holds 4-bit layers only (asymmetric, or symmetric with zero point 8 "
                f"stored); this is {describe_spec(spec)}")
    if spec.group_size not in EXPORT_GROUP_SIZES:
        return f"AWQ in {VLLM} takes group sizes {list(EXPORT_GROUP_SIZES)}; this is {describe_spec(spec)}"
    if out_features % 8:
        return (f"AWQ packs 8 integers per int32 word along the output dim, so out_features must be a "
                f"multiple of 8; this layer has out_features={out_features}")
    return None


# ----------------------------------------------------------------------------
# One layer
# ----------------------------------------------------------------------------
def gptq_layer_tensors(packed: PackedLinear, layer: str = "layer") -> dict[str, torch.Tensor]:
    """GPTQ (v1) tensors of one layer, by name suffix: qweight, qzeros, scales, g_idx."""
    spec = packed.spec
    problem = gptq_refusal(spec, packed.out_features)
    if problem:
        raise ExportError(f"{layer}: {problem}")
    k = packed.in_features
    g = spec.effective_group_size(k)
    q = unpack_int_weights(packed.qweight, spec.bits)  # [K, N], uint8
    zeros_v1 = packed.zero_points().to(torch.int64) - 1  # v1 convention: stored minus one
    return {
        "qweight": pack_rows(q, spec.bits),  # int32 [K // p, N]
        "qzeros": pack_cols(zeros_v1, spec.bits),  # int32 [K // G, N // p]
        "scales": packed.scales.to(torch.float16).contiguous(),  # [K // G, N]
        "g_idx": (torch.arange(k, dtype=torch.int32) // g),  # [K]
    }


def awq_layer_tensors(packed: PackedLinear, layer: str = "layer") -> dict[str, torch.Tensor]:
    """AWQ (GEMM) tensors of one layer, by name suffix: qweight, qzeros, scales."""
    spec = packed.spec
    problem = awq_refusal(spec, packed.out_features)
    if problem:
        raise ExportError(f"{layer}: {problem}")
    q = unpack_int_weights(packed.qweight, spec.bits)  # [K, N], uint8
    return {
        "qweight": pack_cols(q, spec.bits, AWQ_PACK_ORDER),  # int32 [K, N // 8]
        "qzeros": pack_cols(packed.zero_points(), spec.bits, AWQ_PACK_ORDER),  # int32 [K // G, N // 8]
        "scales": packed.scales.to(torch.float16).contiguous(),  # [K // G, N]
    }


def compressed_tensors_refusal(spec: LayerQuantSpec, out_features: int) -> str | None:
    """compressed-tensors' pack-quantized layout in vLLM 0.32 holds every SignRound setting."""
    return None


def compressed_tensors_layer_tensors(packed: PackedLinear, layer: str = "layer") -> dict[str, torch.Tensor]:
    """pack-quantized tensors of one layer: weight_packed, weight_scale, weight_shape, weight_zero_point."""
    ct = to_compressed_tensors(packed, torch.float16)
    out = {"weight_packed": ct.weight_packed,  # int32 [N, K * b / 32]
           "weight_scale": ct.weight_scale,  # float16 [N, K / G]
           "weight_shape": torch.tensor([packed.out_features, packed.in_features], dtype=torch.int64)}
    if ct.weight_zero_point is not None:
        out["weight_zero_point"] = ct.weight_zero_point  # int32 [ceil(N * b / 32), K / G]
    return out


LAYER_EXPORTERS = {"gptq": gptq_layer_tensors, "awq": awq_layer_tensors,
                   COMPRESSED_TENSORS: compressed_tensors_layer_tensors}
REFUSALS = {"gptq": gptq_refusal, "awq": awq_refusal, COMPRESSED_TENSORS: compressed_tensors_refusal}


# ----------------------------------------------------------------------------
# Whole checkpoint
# ----------------------------------------------------------------------------
def _fused_key(name: str) -> tuple[str, str] | None:
    parent, _, leaf = name.rpartition(".")
    return (parent, FUSED_SHARDS[leaf]) if leaf in FUSED_SHARDS else None


def _name_pattern(names: list[str]) -> str:
    """An anchored regex for these modules; shards of one fused layer also match the fused name."""
    key = _fused_key(names[0])
    if key is not None and all(_fused_key(n) == key for n in names):
        parent, fused = key
        leaves = sorted({n.rpartition(".")[2] for n in names}) + [fused]
        return f"^{re.escape(parent)}\\.(?:{'|'.join(leaves)})$"
    assert len(names) == 1
    return f"^{re.escape(names[0])}$"


def _groups_by_fused_layer(names) -> list[list[str]]:
    """Module names grouped as vLLM sees them: shards of one fused layer together."""
    groups: dict[object, list[str]] = {}
    for name in sorted(names):
        groups.setdefault(_fused_key(name) or name, []).append(name)
    return list(groups.values())


def _list_names(names: list[str], limit: int = 3) -> str:
    more = f", ... ({len(names)} layers)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _check_fused_agree(states: Mapping[str, object], fmt: str, what: str) -> None:
    """Shards of one fused layer must agree on `states[name]` (a spec, or None when unquantized)."""
    for group in _groups_by_fused_layer(states):
        found = {name: states[name] for name in group}
        if len(set(found.values())) > 1:
            parent, fused = _fused_key(group[0])
            shown = ", ".join(f"{n.rpartition('.')[2]}: {_describe_state(s)}" for n, s in found.items())
            leaves = ", ".join(n.rpartition(".")[2] for n in group)
            raise ExportError(f"{fmt.upper()} export: vLLM fuses {parent}.{{{leaves}}} into {parent}.{fused}, "
                              f"so they need the same {what}; found {shown}")


def _describe_state(state: object) -> str:
    if state is None:
        return "unquantized"
    return state.short_name() if isinstance(state, LayerQuantSpec) else "quantized"


def _refuse_layers(fmt: str, ckpt: str, layers: Mapping[str, PackedLinear]) -> None:
    problems: dict[str, list[str]] = {}
    refused: set[LayerQuantSpec] = set()
    for name, packed in layers.items():
        problem = REFUSALS[fmt](packed.spec, packed.out_features)
        if problem:
            problems.setdefault(problem, []).append(name)
            refused.add(packed.spec)
    if not problems:
        return
    lines = [f"{problem}: {_list_names(names)}" for problem, names in problems.items()]
    hints = []
    if fmt == "gptq" and any(s.bits == 4 and not s.sym for s in refused):
        hints.append("asymmetric 4-bit layers export with --format awq")
    if fmt == "awq" and any(s.bits == 8 and s.sym for s in refused):
        hints.append("symmetric 8-bit layers export with --format gptq")
    if any(s.bits in (2, 3) for s in refused):
        hints.append("2- and 3-bit layers have no GPTQ or AWQ form in vLLM 0.32; serve them with the "
                     "signround method")
    hint = f"\n({'; '.join(hints)})" if hints else ""
    raise ExportError(f"{ckpt} cannot be exported as {fmt.upper()}:\n  " + "\n  ".join(lines) + hint)


def unquantized_linear_names(rest: Mapping[str, torch.Tensor], config: SignRoundConfig) -> list[str]:
    """Modules stored in full precision because the config lists them in modules_to_not_convert."""
    return sorted(name[: -len(".weight")] for name in rest
                  if name.endswith(".weight") and config.spec_for(name[: -len(".weight")]) is None)


def gptq_quantization_config(layers: Mapping[str, PackedLinear], unquantized: list[str],
                             default: LayerQuantSpec) -> dict:
    """GPTQ `quantization_config`: the base setting, plus `dynamic` rules for the other layers."""
    specs = {name: p.spec for name, p in layers.items()}
    counts = Counter(specs.values())
    base = default if default in counts else max(counts, key=lambda s: (counts[s], s.short_name()))
    dynamic: dict[str, dict] = {}
    for group in _groups_by_fused_layer(n for n, s in specs.items() if s != base):
        spec = specs[group[0]]
        dynamic[f"+:{_name_pattern(group)}"] = {"bits": spec.bits, "group_size": spec.group_size}
    for group in _groups_by_fused_layer(unquantized):
        dynamic[f"-:{_name_pattern(group)}"] = {}
    return {"quant_method": "gptq", "bits": base.bits, "group_size": base.group_size, "sym": True,
            "desc_act": False, "lm_head": LM_HEAD in layers, "checkpoint_format": "gptq", "dynamic": dynamic}


def awq_quantization_config(layers: Mapping[str, PackedLinear], unquantized: list[str],
                            config: SignRoundConfig, ckpt: str) -> dict:
    """AWQ `quantization_config`; every quantized layer must share bits and group size."""
    by_setting: dict[tuple[int, int], list[str]] = {}
    for name, p in layers.items():
        by_setting.setdefault((p.spec.bits, p.spec.group_size), []).append(name)
    if len(by_setting) > 1:
        found = "; ".join(f"bits={b}, group_size={g}: {_list_names(names)}" for (b, g), names in by_setting.items())
        raise ExportError(f"{ckpt} cannot be exported as AWQ: AWQ in {VLLM} has no per-layer settings (only "
                          f"modules_to_not_convert), so every quantized layer must share bits and group size; "
                          f"found {found} (export with --format gptq, whose `dynamic` rules hold per-layer "
                          f"settings, or requantize with one setting)")
    (bits, group_size), = by_setting
    # vLLM skips a layer when an entry is a substring of its name: no entry may hit a quantized layer.
    hits = {u: [n for n in layers if u in n] for u in unquantized}
    for u, names in hits.items():
        if names:
            raise ExportError(f"{ckpt} cannot be exported as AWQ: unquantized module {u} is a substring of "
                              f"quantized {_list_names(names)}, and AWQ's modules_to_not_convert matches by substring")
    extra = [m for m in config.modules_to_not_convert if not any(m in n for n in layers)]
    skip = sorted(set(unquantized) | set(extra))
    return {"quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True,
            "version": "gemm", "lm_head": LM_HEAD in layers, "modules_to_not_convert": skip}


def compressed_tensors_weight_args(spec: LayerQuantSpec) -> dict:
    """The `weights` quantization arguments of one config group."""
    return {"num_bits": spec.bits, "type": "int", "symmetric": spec.sym,
            "strategy": "channel" if spec.group_size == -1 else "group",
            "group_size": None if spec.group_size == -1 else spec.group_size,
            "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax",
            "observer_kwargs": {}}


def compressed_tensors_quantization_config(layers: Mapping[str, PackedLinear], unquantized: list[str],
                                           default: LayerQuantSpec) -> dict:
    """One config group per setting: the most common targets `Linear`, the others name their modules."""
    specs = {name: p.spec for name, p in layers.items()}
    counts = Counter(specs.values())
    base = default if default in counts else max(counts, key=lambda s: (counts[s], s.short_name()))
    ordered = [base] + sorted((s for s in counts if s != base), key=lambda s: s.short_name())
    groups = {}
    for i, spec in enumerate(ordered):
        names = sorted(n for n, s in specs.items() if s == spec)
        targets = ["Linear"] if spec == base else []
        # lm_head is not a `Linear` to vLLM (ParallelLMHead): always named.
        targets += [f"re:^{re.escape(n)}$" for n in names if spec != base or n == LM_HEAD]
        groups[f"group_{i}"] = {"targets": targets, "weights": compressed_tensors_weight_args(spec),
                                "input_activations": None, "output_activations": None,
                                "format": "pack-quantized"}
    return {"quant_method": COMPRESSED_TENSORS, "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": sorted(set(unquantized) | ({LM_HEAD} - set(layers))),
            "kv_cache_scheme": None,
            "global_compression_ratio": None, "version": CT_LAYOUT_VERSION}


def export_checkpoint(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, fmt: str,
                      overwrite: bool = False, progress: Progress | None = None) -> Path:
    """Write the SignRound checkpoint `ckpt_dir` as a compressed-tensors, GPTQ or AWQ model folder (atomically).

    Raises ExportError when a layer's setting cannot be held by `fmt`, FileExistsError when
    `out_dir` exists and not `overwrite`, SignRoundFormatError for a broken checkpoint.
    `progress` receives one-line messages (what was read, notes, what was written).
    """
    say = progress or (lambda _msg: None)
    if fmt not in FORMATS:
        raise ExportError(f"export format {fmt!r} is not supported; choose one of {list(FORMATS)}")
    ckpt, out = Path(ckpt_dir), Path(out_dir)
    if out.exists() and out.resolve() == ckpt.resolve():
        raise ExportError(f"--out {out} is the checkpoint itself; choose another output folder")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another output folder or pass --overwrite")
    hf_config = read_config(ckpt)
    config = read_quant_config(ckpt)
    layers, rest = split_packed_layers(load_tensors(ckpt), config, str(ckpt))
    if not layers:
        raise ExportError(f"{ckpt} holds no quantized layers; nothing to export")
    experts = sorted(n for n in layers if ".experts." in n)
    if experts and fmt == COMPRESSED_TENSORS:
        raise ExportError(f"{ckpt} holds mixture-of-experts layers ({_list_names(experts)}); exporting them to "
                          f"{fmt} is not built yet (export them as gptq or awq, or serve the checkpoint with "
                          f"the signround method: vllm serve {ckpt})")
    if experts:
        say(f"note: {VLLM} serves {fmt.upper()} experts with its int4 MoE kernels: Marlin on CUDA, and on CPU "
            f"only on x86 CPUs with AMX")
    unquantized = unquantized_linear_names(rest, config)
    counts = Counter(p.spec.short_name() for p in layers.values())
    say(f"read {len(layers)} quantized layers ({', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))}) "
        f"and {len(unquantized)} unquantized linear layers from {ckpt}")

    _refuse_layers(fmt, str(ckpt), layers)
    states: dict[str, object] = {n: (p.spec if fmt != "awq" else True) for n, p in layers.items()}
    states.update({n: None for n in unquantized})
    _check_fused_agree(states, fmt, "settings" if fmt != "awq" else "quantization (all or none)")
    if fmt == COMPRESSED_TENSORS:
        qconfig = compressed_tensors_quantization_config(layers, unquantized, config.default)
        if any(p.spec.bits != 4 for p in layers.values()):
            say(f"note: {VLLM} serves compressed-tensors 2-, 3- and 8-bit layers with CUDA kernels only "
                f"(Humming for 2/3 bits, Machete or Marlin for 8); its CPU kernel takes 4-bit")
    elif fmt == "gptq":
        qconfig = gptq_quantization_config(layers, unquantized, config.default)
        if any(p.spec.bits == 8 for p in layers.values()):
            say(f"note: {VLLM} serves 8-bit GPTQ layers with CUDA kernels only; its CPU kernel takes 4-bit")
    else:
        qconfig = awq_quantization_config(layers, unquantized, config, str(ckpt))

    tensors = dict(rest)
    for name, packed in layers.items():
        for suffix, t in LAYER_EXPORTERS[fmt](packed, name).items():
            tensors[f"{name}.{suffix}"] = t
    hf_config = {**hf_config, "quantization_config": qconfig}
    info = {"exported_by": "signround export", "format": fmt, "source": str(ckpt),
            "source_quantization_config": config.to_dict()}
    written = write_model_folder(out, tensors, hf_config, source_dir=ckpt, overwrite=overwrite,
                                 extra_json={EXPORT_INFO_FILE: info})
    say(f"wrote {fmt} checkpoint {written} ({len(layers)} layers; load it with vLLM's built-in "
        f"`{fmt}` method)")
    return written
