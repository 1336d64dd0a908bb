"""The SignRound packed checkpoint format: the one definition.

Everything that reads or writes SignRound checkpoints (the tuner, the kernels'
tests, the vLLM plugin, the exporters) goes through this module. It needs only
torch: no vLLM, no Triton.

Per quantized linear layer ``P`` with a PyTorch weight of shape ``[N, K]``
(``N`` = out_features, ``K`` = in_features), bit width ``b`` and group size
``G`` (``G = K`` when the config says -1, i.e. one group per output channel):

==============  =========  ===================  ======================================
tensor          dtype      shape                meaning
==============  =========  ===================  ======================================
``P.qweight``   int32      ``[K * b // 32, N]`` unsigned b-bit integers q in [0, 2^b),
                                                 packed along K (see bit order below)
``P.scales``    float16    ``[K // G, N]``      one scale per group and output channel;
                                                 may be negative (symmetric full range)
``P.qzeros``    uint8      ``[K // G, N]``      asymmetric only: zero point z in [0, 2^b)
``P.bias``      any float  ``[N]``              unchanged, when the layer has one
==============  =========  ===================  ======================================

Dequantization: ``W[n, k] = (q[k, n] - z[k // G, n]) * s[k // G, n]``, where the
zero point of a symmetric layer is the implied constant ``z = 2^(b-1)`` and no
``qzeros`` tensor is stored. Zero points are stored as they are (no "minus one"
convention as in GPTQ v1).

Bit order: along K, each run of 32 consecutive integers occupies ``b``
consecutive int32 words as one little-endian bit stream: integer ``i`` of the run
(0..31) sits at stream bits ``[i*b, i*b + b)``, where stream bit ``j`` is bit
``j % 32`` of word ``j // 32`` (bit 0 = least significant). For b = 2, 4, 8 no
integer crosses a word; for b = 3 some integers straddle two words. Hence K must
be a multiple of 32 and of G.

``quantization_config`` in config.json (see :class:`SignRoundConfig`)::

    {"quant_method": "signround", "format_version": 1,
     "bits": 4, "group_size": 128, "sym": false,
     "modules_to_not_convert": ["lm_head"],
     "layer_overrides": {"model.layers.0.mlp.down_proj": {"bits": 8}}}

``layer_overrides`` maps a full module name (as in the checkpoint) to any of
``bits``, ``group_size``, ``sym``; missing keys take the defaults. A module whose
dotted name contains an entry of ``modules_to_not_convert`` as whole components
(``lm_head``, ``model.layers.3``, ``experts``, ``model.layers.0.mlp.gate``) is
stored unquantized (``P.weight``). A quantized ``lm_head`` is stored like any linear layer;
when the source model ties it to the input embedding, the checkpoint keeps that embedding
unquantized, stores ``lm_head.*`` apart and says ``"tie_word_embeddings": false``.

Mixture-of-experts layers store each expert's projections as layers of their own,
under the names the model's own checkpoint uses and vLLM's loaders read
(``model.layers.L.mlp.experts.E.gate_proj``/``up_proj``/``down_proj``; Mixtral:
``model.layers.L.block_sparse_moe.experts.E.w1``/``w3``/``w2``). vLLM runs all experts
of a layer as one fused tensor for gate/up and one for down, so every expert of a
layer has the same settings for gate and up, and the same for down. Routers
(``mlp.gate``, ``mlp.shared_expert_gate``) are listed in ``modules_to_not_convert``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

QUANT_METHOD = "signround"
FORMAT_VERSION = 1
SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)  # -1: one group per output channel
WORD_BITS = 32  # packing word: int32
PACK_RUN = 32  # integers per run of `bits` words
SCALE_DTYPE = torch.float16
ZERO_DTYPE = torch.uint8

QWEIGHT = "qweight"
SCALES = "scales"
QZEROS = "qzeros"


class SignRoundFormatError(ValueError):
    """A config or a tensor does not follow the SignRound format."""


# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LayerQuantSpec:
    """How one linear layer is quantized."""

    bits: int = 4
    group_size: int = 128  # -1: per output channel
    sym: bool = False

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in SUPPORTED_BITS:
            raise SignRoundFormatError(f"bits={self.bits!r} is not supported; supported: {list(SUPPORTED_BITS)}")
        if (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                or self.group_size not in SUPPORTED_GROUP_SIZES):
            raise SignRoundFormatError(
                f"group_size={self.group_size!r} is not supported; supported: "
                f"{list(SUPPORTED_GROUP_SIZES)} (-1 = one group per output channel)")
        if not isinstance(self.sym, bool):
            raise SignRoundFormatError(f"sym={self.sym!r} must be true or false")

    @property
    def max_int(self) -> int:
        return (1 << self.bits) - 1

    @property
    def sym_zero_point(self) -> int:
        return 1 << (self.bits - 1)

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def check_in_features(self, in_features: int, layer: str = "layer") -> None:
        """Raise unless a layer with `in_features` inputs can be stored with this spec."""
        if in_features % PACK_RUN:
            raise SignRoundFormatError(
                f"{layer}: in_features={in_features} is not a multiple of {PACK_RUN}, "
                f"which the packed layout requires")
        g = self.effective_group_size(in_features)
        if in_features % g:
            raise SignRoundFormatError(
                f"{layer}: group_size={self.group_size} does not divide in_features={in_features}; "
                f"use a group size that divides it, or -1 (per channel)")

    def short_name(self) -> str:
        g = "C" if self.group_size == -1 else str(self.group_size)
        return f"W{self.bits}G{g}{'sym' if self.sym else 'asym'}"


_SPEC_KEYS = {f.name for f in dataclasses.fields(LayerQuantSpec)}
_CONFIG_KEYS = {"quant_method", "format_version", "bits", "group_size", "sym",
                "modules_to_not_convert", "layer_overrides", "tuner"}


@dataclasses.dataclass(frozen=True)
class SignRoundConfig:
    """The `quantization_config` of a SignRound checkpoint."""

    default: LayerQuantSpec = LayerQuantSpec()
    modules_to_not_convert: tuple[str, ...] = ("lm_head",)
    layer_overrides: Mapping[str, LayerQuantSpec] = dataclasses.field(default_factory=dict)
    tuner: Mapping[str, Any] | None = None  # provenance only (method, iters, ...); never read

    def spec_for(self, module_name: str) -> LayerQuantSpec | None:
        """The spec of a module by checkpoint name, or None if it is kept unquantized."""
        dotted = f".{module_name}."
        for skipped in self.modules_to_not_convert:
            if f".{skipped}." in dotted:  # whole name components: "lm_head", "model.layers.3", "experts"
                return None
        return self.layer_overrides.get(module_name, self.default)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "bits": self.default.bits,
            "group_size": self.default.group_size,
            "sym": self.default.sym,
            "modules_to_not_convert": list(self.modules_to_not_convert),
            "layer_overrides": {
                name: {k: v for k, v in dataclasses.asdict(spec).items()
                       if v != getattr(self.default, k)}
                for name, spec in sorted(self.layer_overrides.items())
            },
        }
        if self.tuner is not None:
            d["tuner"] = dict(self.tuner)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SignRoundConfig":
        if not isinstance(d, Mapping):
            raise SignRoundFormatError(f"quantization_config must be a JSON object, got {type(d).__name__}")
        method = d.get("quant_method")
        if method != QUANT_METHOD:
            raise SignRoundFormatError(f"quant_method={method!r}; expected {QUANT_METHOD!r}")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise SignRoundFormatError(
                f"format_version={version!r} is not supported; this version of signround-vllm reads "
                f"format_version {FORMAT_VERSION}")
        unknown = set(d) - _CONFIG_KEYS
        if unknown:
            raise SignRoundFormatError(
                f"unknown quantization_config keys {sorted(unknown)}; accepted: {sorted(_CONFIG_KEYS)}")
        missing = [k for k in ("bits", "group_size") if k not in d]
        if missing:
            raise SignRoundFormatError(f"quantization_config lacks {missing}")
        default = LayerQuantSpec(bits=d["bits"], group_size=d["group_size"], sym=d.get("sym", False))
        skip = d.get("modules_to_not_convert", ["lm_head"])
        if skip is None:
            skip = []
        if not isinstance(skip, (list, tuple)) or not all(isinstance(s, str) for s in skip):
            raise SignRoundFormatError(f"modules_to_not_convert must be a list of module names, got {skip!r}")
        raw_overrides = d.get("layer_overrides") or {}
        if not isinstance(raw_overrides, Mapping):
            raise SignRoundFormatError(
                f"layer_overrides must map module names to {{bits, group_size, sym}}, got {raw_overrides!r}")
        overrides = {}
        for name, o in raw_overrides.items():
            if not isinstance(o, Mapping) or set(o) - _SPEC_KEYS:
                raise SignRoundFormatError(
                    f"layer_overrides[{name!r}]={o!r}: expected an object with keys among {sorted(_SPEC_KEYS)}")
            try:
                overrides[name] = dataclasses.replace(default, **o)
            except SignRoundFormatError as e:
                raise SignRoundFormatError(f"layer_overrides[{name!r}]: {e}") from None
        tuner = d.get("tuner")
        return cls(default=default, modules_to_not_convert=tuple(skip), layer_overrides=overrides,
                   tuner=dict(tuner) if isinstance(tuner, Mapping) else None)


# ----------------------------------------------------------------------------
# Packing: unsigned b-bit integers along K <-> int32 words
# ----------------------------------------------------------------------------
def _run_layout(bits: int):
    """For each of the 32 integers of a run: (word index, shift within word)."""
    return [((i * bits) // WORD_BITS, (i * bits) % WORD_BITS) for i in range(PACK_RUN)]


def _to_int32(words_u32: torch.Tensor) -> torch.Tensor:
    """int64 tensor of values in [0, 2^32) -> int32 with the same bits."""
    return torch.where(words_u32 >= 2 ** 31, words_u32 - 2 ** 32, words_u32).to(torch.int32)


def pack_int_weights(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers q [K, N] in [0, 2^bits) along K into int32 [K * bits // 32, N]."""
    if bits not in SUPPORTED_BITS:
        raise SignRoundFormatError(f"bits={bits} is not supported; supported: {list(SUPPORTED_BITS)}")
    if q.dim() != 2 or q.shape[0] % PACK_RUN:
        raise SignRoundFormatError(f"pack_int_weights needs a [K, N] tensor with K % {PACK_RUN} == 0, "
                                   f"got shape {tuple(q.shape)}")
    if q.dtype.is_floating_point or q.dtype == torch.bool:
        raise SignRoundFormatError(f"pack_int_weights needs an integer tensor, got {q.dtype}")
    k, n = q.shape
    q64 = q.to(torch.int64)
    if q64.numel() and (int(q64.min()) < 0 or int(q64.max()) >= (1 << bits)):
        raise SignRoundFormatError(
            f"integers out of range for {bits} bits: [{int(q64.min())}, {int(q64.max())}] not in [0, {(1 << bits) - 1}]")
    runs = q64.reshape(k // PACK_RUN, PACK_RUN, n)
    words = torch.zeros(k // PACK_RUN, bits, n, dtype=torch.int64, device=q.device)
    for i, (w, shift) in enumerate(_run_layout(bits)):
        words[:, w] |= (runs[:, i] << shift) & 0xFFFFFFFF
        if shift + bits > WORD_BITS:  # straddles into the next word
            words[:, w + 1] |= runs[:, i] >> (WORD_BITS - shift)
    return _to_int32(words.reshape(k // PACK_RUN * bits, n))


def unpack_int_weights(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_int_weights: int32 [K * bits // 32, N] -> uint8 [K, N]."""
    if bits not in SUPPORTED_BITS:
        raise SignRoundFormatError(f"bits={bits} is not supported; supported: {list(SUPPORTED_BITS)}")
    if packed.dim() != 2 or packed.dtype != torch.int32 or packed.shape[0] % bits:
        raise SignRoundFormatError(
            f"unpack_int_weights needs an int32 [K * {bits} // 32, N] tensor, got {packed.dtype} "
            f"{tuple(packed.shape)}")
    rows, n = packed.shape
    runs = rows // bits
    words = (packed.to(torch.int64) & 0xFFFFFFFF).reshape(runs, bits, n)
    mask = (1 << bits) - 1
    out = torch.empty(runs, PACK_RUN, n, dtype=torch.int64, device=packed.device)
    for i, (w, shift) in enumerate(_run_layout(bits)):
        v = words[:, w] >> shift
        if shift + bits > WORD_BITS:
            v = v | (words[:, w + 1] << (WORD_BITS - shift))
        out[:, i] = v & mask
    return out.reshape(runs * PACK_RUN, n).to(torch.uint8)


# ----------------------------------------------------------------------------
# Layer tensors
# ----------------------------------------------------------------------------
def packed_tensor_specs(in_features: int, out_features: int, spec: LayerQuantSpec,
                        layer: str = "layer") -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names (suffixes), shapes and dtypes of the tensors of one quantized linear layer."""
    spec.check_in_features(in_features, layer)
    groups = in_features // spec.effective_group_size(in_features)
    out = {
        QWEIGHT: ((in_features * spec.bits // WORD_BITS, out_features), torch.int32),
        SCALES: ((groups, out_features), SCALE_DTYPE),
    }
    if not spec.sym:
        out[QZEROS] = ((groups, out_features), ZERO_DTYPE)
    return out


@dataclasses.dataclass
class PackedLinear:
    """The stored tensors of one quantized linear layer (bias not included)."""

    qweight: torch.Tensor  # int32 [K * bits // 32, N]
    scales: torch.Tensor  # float16 [K // G, N]
    qzeros: torch.Tensor | None  # uint8 [K // G, N], None when symmetric
    spec: LayerQuantSpec

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * WORD_BITS // self.spec.bits

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        d = {f"{prefix}.{QWEIGHT}": self.qweight, f"{prefix}.{SCALES}": self.scales}
        if self.qzeros is not None:
            d[f"{prefix}.{QZEROS}"] = self.qzeros
        return d

    def zero_points(self) -> torch.Tensor:
        """uint8 [K // G, N]: the stored zero points, or the implied 2^(bits-1) of a symmetric layer."""
        if self.qzeros is not None:
            return self.qzeros
        return torch.full(tuple(self.scales.shape), self.spec.sym_zero_point, dtype=ZERO_DTYPE,
                          device=self.scales.device)

    def validate(self, layer: str = "layer") -> None:
        k, n = self.in_features, self.out_features
        found = {QWEIGHT: self.qweight, SCALES: self.scales}
        if self.qzeros is not None:
            found[QZEROS] = self.qzeros
        validate_layer_tensors(layer, found, self.spec, k, n)


def validate_layer_tensors(layer: str, tensors: Mapping[str, torch.Tensor], spec: LayerQuantSpec,
                           in_features: int, out_features: int) -> None:
    """Raise SignRoundFormatError naming the layer and tensor unless `tensors` match the spec."""
    expected = packed_tensor_specs(in_features, out_features, spec, layer)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise SignRoundFormatError(
            f"{layer} ({spec.short_name()}): missing tensors {[f'{layer}.{m}' for m in missing]}, "
            f"unexpected {[f'{layer}.{e}' for e in extra]}; a "
            f"{'symmetric' if spec.sym else 'asymmetric'} layer stores {sorted(expected)}")
    for name, (shape, dtype) in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise SignRoundFormatError(
                f"{layer}.{name}: found {t.dtype} {tuple(t.shape)}, expected {dtype} {shape} for "
                f"in_features={in_features}, out_features={out_features}, {spec.short_name()}")


def dequantize_ints(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    spec: LayerQuantSpec) -> torch.Tensor:
    """w = (q - zero) * scale per group, in float32. q [K, N] integers, scales/zeros [K // G, N]
    (zeros None: the symmetric zero point). The one definition of the format's dequantization."""
    g = spec.effective_group_size(q.shape[0])
    z = (torch.full_like(scales, spec.sym_zero_point, dtype=torch.float32) if zeros is None
         else zeros.to(torch.float32))
    return (q.to(torch.float32) - z.repeat_interleave(g, dim=0)) * scales.to(torch.float32).repeat_interleave(g, dim=0)


def dequantize_packed(packed: PackedLinear, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pure-torch dequantization: the reference for every kernel. Returns W [N, K] in `dtype`."""
    q = unpack_int_weights(packed.qweight, packed.spec.bits)  # [K, N]
    return dequantize_ints(q, packed.scales, packed.qzeros, packed.spec).t().contiguous().to(dtype)


def pack_linear(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                spec: LayerQuantSpec) -> PackedLinear:
    """Build a PackedLinear from integers q [N, K] (PyTorch layout), scales and zero points [N, K // G].

    For a symmetric spec `zeros` must be None (the implied zero point is 2^(bits-1)).
    """
    if (zeros is None) != spec.sym:
        raise SignRoundFormatError(f"{'symmetric' if spec.sym else 'asymmetric'} layers "
                                   f"{'take no' if spec.sym else 'need'} zero points")
    n, k = q.shape
    spec.check_in_features(k)
    if not torch.isfinite(scales).all():
        raise SignRoundFormatError("scales contain NaN or Inf; refusing to store them")
    qweight = pack_int_weights(q.t().contiguous(), spec.bits)
    s = scales.t().contiguous().to(SCALE_DTYPE)
    z = None
    if zeros is not None:
        zi = (zeros.round() if zeros.dtype.is_floating_point else zeros).to(torch.int64)
        if zi.numel() and (int(zi.min()) < 0 or int(zi.max()) > spec.max_int):
            raise SignRoundFormatError(f"zero points out of range [0, {spec.max_int}]")
        z = zi.t().contiguous().to(ZERO_DTYPE)
    packed = PackedLinear(qweight=qweight, scales=s, qzeros=z, spec=spec)
    packed.validate()
    return packed


def num_groups(in_features: int, spec: LayerQuantSpec) -> int:
    return in_features // spec.effective_group_size(in_features)


def bits_per_weight(spec: LayerQuantSpec, in_features: int) -> float:
    """Stored bits per weight, scales and zero points included."""
    g = spec.effective_group_size(in_features)
    extra = 16 + (0 if spec.sym else 8)
    return spec.bits + extra / g


