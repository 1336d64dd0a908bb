"""Kernel candidates for SignRound linear layers inside vLLM, and the one chooser.

Each candidate has a short `name`, answers `can_implement(geometry) -> (ok, reason)`,
checks and repacks a loaded layer once in `prepare`, and only computes `x @ W^T + bias`
in `apply` (through a registered operator where the kernel is ours, so torch.compile
captures it). `choose_kernel` takes the first candidate of `ORDER[device type]` that can
serve the layer, or only the candidate forced by name (the `SIGNROUND_KERNEL` setting).
"""
from __future__ import annotations

import dataclasses

import torch

from signround_vllm.format import (
    QWEIGHT, QZEROS, SCALES, LayerQuantSpec, PackedLinear, dequantize_packed, pack_int_weights,
    unpack_int_weights,
)


@dataclasses.dataclass(frozen=True)
class LayerGeometry:
    """What a kernel needs to know about one (possibly fused, possibly sharded) layer."""

    name: str
    spec: LayerQuantSpec
    in_features: int  # per tensor-parallel rank
    out_features: int  # per rank, fused outputs summed
    act_dtype: torch.dtype
    device: torch.device


def _packed_from_layer(layer, spec: LayerQuantSpec) -> PackedLinear:
    return PackedLinear(qweight=layer.qweight.data, scales=layer.scales.data,
                        qzeros=getattr(layer, QZEROS).data if hasattr(layer, QZEROS) else None, spec=spec)


def _drop_packed_params(layer) -> None:
    for name in (QWEIGHT, SCALES, QZEROS):
        if hasattr(layer, name):
            delattr(layer, name)


class TritonDequantGemm:
    """Fused dequantize + GEMM in Triton, reading the packed layout directly (`signround::dequant_gemm`).

    Runs on CUDA; on CPU only inside Triton's interpreter (TRITON_INTERPRET=1), for tests.
    """

    name = "triton"

    def __init__(self, geometry: LayerGeometry):
        self.g = geometry
        self.group_size = geometry.spec.effective_group_size(geometry.in_features)

    @staticmethod
    def can_implement(g: LayerGeometry) -> tuple[bool, str | None]:
        try:
            from signround_triton import dequant_gemm
        except ImportError as e:
            return False, f"signround_triton.dequant_gemm is not importable ({e})"
        if g.act_dtype not in dequant_gemm.ACT_DTYPES:
            return False, f"activation dtype {g.act_dtype} (supported: float16, bfloat16)"
        if g.device.type == "cpu" and not dequant_gemm.is_interpreted():
            return False, "Triton runs on CPU tensors only in its interpreter (TRITON_INTERPRET=1 set before " \
                          "triton is imported)"
        if g.device.type not in ("cpu", "cuda"):
            return False, f"Triton dequant-GEMM needs a CUDA device (layer is on {g.device.type})"
        return True, None

    def prepare(self, layer) -> None:
        from signround_triton import ops  # noqa: F401  registers torch.ops.signround.dequant_gemm
        from signround_triton.dequant_gemm import check_operands

        for name in (QWEIGHT, SCALES, QZEROS):
            if hasattr(layer, name):
                p = getattr(layer, name)
                delattr(layer, name)
                layer.register_parameter(name, torch.nn.Parameter(p.data.contiguous(), requires_grad=False))
        bias = getattr(layer, "bias", None)
        check_operands(layer.qweight, layer.scales, getattr(layer, QZEROS, None), self.g.spec.bits,
                       self.group_size, self.g.in_features, bias if isinstance(bias, torch.Tensor) else None)

    def apply(self, layer, x, bias=None):
        return torch.ops.signround.dequant_gemm(x, layer.qweight, layer.scales, getattr(layer, QZEROS, None), bias,
                                                self.g.spec.bits, self.group_size)


class CpuWna16:
    """vLLM's CPU int4 GEMM (`CPUWNA16LinearKernel`); 2- and 3-bit integers sit in 4-bit containers."""

    name = "cpu_wna16"

    def __init__(self, geometry: LayerGeometry):
        self.g = geometry

    @staticmethod
    def _mp_config(g: LayerGeometry):
        from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearLayerConfig
        from vllm.scalar_type import scalar_types

        four_bit_sym = g.spec.sym and g.spec.bits == 4
        return MPLinearLayerConfig(
            full_weight_shape=(g.in_features, g.out_features),
            partition_weight_shape=(g.in_features, g.out_features),
            weight_type=scalar_types.uint4b8 if four_bit_sym else scalar_types.uint4,
            act_type=g.act_dtype, group_size=g.spec.group_size, zero_points=not four_bit_sym)

    @staticmethod
    def can_implement(g: LayerGeometry) -> tuple[bool, str | None]:
        if g.device.type != "cpu":
            return False, "vLLM's CPU int4 kernel runs only on CPU"
        if g.spec.bits > 4:
            return False, f"{g.spec.bits}-bit integers do not fit its 4-bit containers"
        try:
            from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel
        except ImportError as e:
            return False, f"vLLM has no CPUWNA16LinearKernel ({e})"
        return CPUWNA16LinearKernel.can_implement(CpuWna16._mp_config(g))

    def prepare(self, layer) -> None:
        from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel
        from vllm.model_executor.layers.quantization.utils.quant_utils import pack_quantized_values_into_int32
        from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter
        from vllm.scalar_type import scalar_types

        g, spec = self.g, self.g.spec
        config = self._mp_config(g)
        q = unpack_int_weights(layer.qweight.data, spec.bits)  # uint8 [K, N]
        qweight4 = pack_int_weights(q, 4)  # int32 [K / 8, N]; 4-bit GPTQ order == this format at 4 bits
        scales = layer.scales.data.to(g.act_dtype)  # [K / G, N]
        zeros = None
        if config.zero_points:
            z = (layer.qzeros.data.to(torch.int32) if not spec.sym
                 else torch.full(scales.shape, spec.sym_zero_point, dtype=torch.int32))
            zeros = pack_quantized_values_into_int32(z, scalar_types.uint4, packed_dim=1)  # [K / G, N / 8]
        _drop_packed_params(layer)

        def noop_loader(*args, **kwargs):
            raise RuntimeError("repacked SignRound weights cannot be reloaded")

        layer.register_parameter("wna16_qweight", PackedvLLMParameter(
            data=qweight4, input_dim=0, output_dim=1, packed_dim=0, packed_factor=8, weight_loader=noop_loader))
        layer.register_parameter("wna16_scales", GroupQuantScaleParameter(
            data=scales, input_dim=0, output_dim=1, weight_loader=noop_loader))
        if zeros is not None:
            layer.register_parameter("wna16_qzeros", PackedvLLMParameter(
                data=zeros, input_dim=0, output_dim=1, packed_dim=1, packed_factor=8, weight_loader=noop_loader))
        self.kernel = CPUWNA16LinearKernel(config, w_q_param_name="wna16_qweight", w_s_param_name="wna16_scales",
                                           w_zp_param_name="wna16_qzeros" if zeros is not None else None)
        self.kernel.process_weights_after_loading(layer)

    def apply(self, layer, x, bias=None):
        return self.kernel.apply_weights(layer, x, bias)


class DenseDequantized:
    """Fallback: dequantize once at load and run a dense matmul (fast, but no memory saving)."""

    name = "dense"

    def __init__(self, geometry: LayerGeometry):
        self.g = geometry

    @staticmethod
    def can_implement(g: LayerGeometry) -> tuple[bool, str | None]:
        return True, None

    def prepare(self, layer) -> None:
        w = dequantize_packed(_packed_from_layer(layer, self.g.spec), self.g.act_dtype)  # [N, K]
        _drop_packed_params(layer)
        layer.register_parameter("dense_weight", torch.nn.Parameter(w, requires_grad=False))

    def apply(self, layer, x, bias=None):
        return torch.nn.functional.linear(x, layer.dense_weight, bias)


CANDIDATES = {cls.name: cls for cls in (TritonDequantGemm, CpuWna16, DenseDequantized)}
# The order candidates are tried in, by device type; a forced candidate is tried alone.
ORDER = {"cuda": ("triton", "dense"), "cpu": ("cpu_wna16", "dense")}
FORCE_SETTING = "SIGNROUND_KERNEL"
_logged: set[tuple] = set()


def choose_kernel(g: LayerGeometry, forced: str | None = None, order: tuple[str, ...] | None = None):
    """The first candidate that can serve `g`; ValueError listing every reason if none can.

    forced: a candidate name (the $SIGNROUND_KERNEL setting): only it is tried. order: the
    names to try otherwise (default: ORDER for the layer's device type).
    """
    from vllm.logger import init_logger

    logger = init_logger("vllm.signround")
    if forced:
        if forced not in CANDIDATES:
            raise ValueError(f"{FORCE_SETTING}={forced!r} names no SignRound kernel; choose one of {list(CANDIDATES)}")
        names = (forced,)
    else:
        names = order or ORDER.get(g.device.type, ("dense",))
    reasons = []
    for name in names:
        cls = CANDIDATES[name]
        ok, why = cls.can_implement(g)
        if ok:
            key = (name, g.spec, tuple(reasons), forced)
            if key not in _logged:
                _logged.add(key)
                how = f"forced by {FORCE_SETTING}={forced}" if forced else "chosen"
                if cls is DenseDequantized and not forced:
                    logger.warning("SignRound %s layers (e.g. %s): no packed kernel fits, so weights are "
                                   "dequantized to %s at load (no memory saving). Reasons: %s",
                                   g.spec.short_name(), g.name, g.act_dtype, "; ".join(reasons))
                else:
                    logger.info("SignRound %s layers (e.g. %s) use kernel %r (%s)", g.spec.short_name(), g.name,
                                name, how)
            return cls(g)
        reasons.append(f"{name}: {why}")
    forced_note = f" (forced by {FORCE_SETTING}={forced})" if forced else ""
    raise ValueError(f"{g.name}: no kernel can serve {g.spec.short_name()} with in_features={g.in_features}, "
                     f"out_features={g.out_features}, dtype={g.act_dtype} on {g.device.type}{forced_note}:\n  "
                     + "\n  ".join(reasons))
