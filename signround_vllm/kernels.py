"""Kernel candidates for SignRound linear layers inside vLLM, and the one chooser.

Each candidate has a short `name`, answers `can_implement(geometry) -> (ok, reason)`,
checks and repacks a loaded layer once in `prepare`, and only computes `x @ W^T + bias`
in `apply` (through a registered operator where the kernel is ours, so torch.compile
captures it). `choose_kernel` takes the first candidate of `default_order(device type)` that can
serve the layer, or only the candidate forced by name (the `SIGNROUND_KERNEL` setting).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

from signround_vllm import cpu_int4
from signround_vllm.format import QWEIGHT, QZEROS, SCALES, LayerQuantSpec, PackedLinear, dequantize_packed


@dataclasses.dataclass(frozen=True)
class LayerGeometry:
    """What a kernel needs to know about one (possibly fused, possibly sharded) layer."""

    name: str
    spec: LayerQuantSpec
    in_features: int  # per tensor-parallel rank
    out_features: int  # per rank, fused outputs summed
    act_dtype: torch.dtype
    device: torch.device
    full_in_features: int | None = None  # before tensor-parallel splitting (None: in_features)


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
        from signround_triton.dequant_gemm import kernel_group_size

        self.g = geometry
        self.group_size = kernel_group_size(geometry.spec.group_size, geometry.in_features)

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


class VllmMixedPrecision:
    """vLLM's own mixed-precision GEMMs, through vLLM's kernel chooser (Machete or Marlin for 4/8 bits,
    Humming for 2/3 bits when installed, on CUDA; CPUWNA16 for 4 bits on CPU).

    The layer is repacked into compressed-tensors' pack-quantized layout (`signround_vllm.layouts`),
    the layout vLLM's own `CompressedTensorsWNA16` hands these kernels, and the chosen kernel repacks
    it once more into its own. The weight types are exact: `uint{b}` with zero points for asymmetric
    layers, `uint{b}b{2^(b-1)}` (the implied zero point) for symmetric ones.
    """

    name = "vllm"
    container_bits: int | None = None  # None: the layer's own width

    def __init__(self, geometry: LayerGeometry):
        self.g = geometry
        self.kernel_class = self._choose(geometry)[0]

    @classmethod
    def _mp_config(cls, g: LayerGeometry):
        from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearLayerConfig
        from vllm.scalar_type import scalar_types

        bits = cls.container_bits or g.spec.bits
        sym = g.spec.sym and cls.container_bits is None  # widened layers carry explicit zero points
        weight_type = getattr(scalar_types, f"uint{bits}b{1 << (bits - 1)}" if sym else f"uint{bits}")
        return MPLinearLayerConfig(
            full_weight_shape=(g.full_in_features or g.in_features, g.out_features),
            partition_weight_shape=(g.in_features, g.out_features),
            weight_type=weight_type, act_type=g.act_dtype, group_size=g.spec.group_size, zero_points=not sym)

    @classmethod
    def _choose(cls, g: LayerGeometry):
        """(vLLM's kernel class, None) or (None, why not)."""
        try:
            from vllm.model_executor.kernels.linear import choose_mp_linear_kernel
            from vllm.platforms import current_platform
        except ImportError as e:
            return None, f"vLLM has no mixed-precision kernel chooser ({e})"
        if current_platform.device_type != g.device.type:
            return None, f"this vLLM build runs on {current_platform.device_type}, the layer is on {g.device.type}"
        config = cls._mp_config(g)
        try:
            return choose_mp_linear_kernel(config), None
        except ValueError as e:
            reasons = "; ".join(line.strip() for line in str(e).splitlines()[1:] if line.strip())
            return None, f"no vLLM kernel takes {config.weight_type} (group {g.spec.group_size}): {reasons}"

    @classmethod
    def can_implement(cls, g: LayerGeometry) -> tuple[bool, str | None]:
        chosen, why = cls._choose(g)
        return chosen is not None, why

    def describe(self) -> str:
        if self.kernel_class.__name__ == "CPUWNA16LinearKernel" and cpu_w4a8(self.g.act_dtype):
            return "CPUWNA16LinearKernel, W4A8 (activations rounded to int8 per token)"
        return self.kernel_class.__name__

    def _packed_for_kernel(self, layer) -> PackedLinear:
        return _packed_from_layer(layer, self.g.spec)

    def prepare(self, layer) -> None:
        from vllm.model_executor.parameter import (
            ChannelQuantScaleParameter, GroupQuantScaleParameter, PackedvLLMParameter,
        )

        from signround_vllm.layouts import to_compressed_tensors

        packed = self._packed_for_kernel(layer)
        ct = to_compressed_tensors(packed, self.g.act_dtype)
        _drop_packed_params(layer)

        def no_reload(*args, **kwargs):
            raise RuntimeError("repacked SignRound weights cannot be reloaded")

        layer.register_parameter("weight_packed", PackedvLLMParameter(
            data=ct.weight_packed, input_dim=1, output_dim=0, packed_dim=1, packed_factor=ct.pack_factor,
            weight_loader=no_reload))
        scale_class = ChannelQuantScaleParameter if packed.spec.group_size == -1 else GroupQuantScaleParameter
        scale_dims = dict(output_dim=0) if packed.spec.group_size == -1 else dict(output_dim=0, input_dim=1)
        layer.register_parameter("weight_scale", scale_class(data=ct.weight_scale, weight_loader=no_reload,
                                                             **scale_dims))
        if ct.weight_zero_point is not None:
            layer.register_parameter("weight_zero_point", PackedvLLMParameter(
                data=ct.weight_zero_point, input_dim=1, output_dim=0, packed_dim=0, packed_factor=ct.pack_factor,
                weight_loader=no_reload))
        # The zero-point name is given even for symmetric layers, as vLLM's compressed-tensors method gives
        # it: CPUWNA16's W4A8 path (AMX CPUs) allocates implied zero points under it and fails without it.
        self.kernel = self.kernel_class(self._mp_config(self.g), w_q_param_name="weight_packed",
                                        w_s_param_name="weight_scale", w_zp_param_name="weight_zero_point")
        if self.g.device.type == "cpu" and not cpu_w4a8(self.g.act_dtype):
            with _w4a8_off():
                self.kernel.process_weights_after_loading(layer)
            if getattr(layer, "use_w4a8", False):
                raise RuntimeError(f"{self.g.name}: vLLM's CPUWNA16 chose W4A8 although it was turned off; "
                                   f"this vLLM version reads the setting in a way the plugin does not know")
        else:
            self.kernel.process_weights_after_loading(layer)

    def apply(self, layer, x, bias=None):
        return self.kernel.apply_weights(layer, x, bias)


W4A8_SETTING = "VLLM_CPU_INT4_W4A8"


def cpu_w4a8(act_dtype: torch.dtype) -> bool:
    """Whether our layers on vLLM's CPUWNA16 kernel run W4A8 (activations rounded to int8 per token).

    vLLM runs W4A8 on AMX CPUs with bf16 activations unless VLLM_CPU_INT4_W4A8=0. For SignRound layers it
    is opt-in: only when VLLM_CPU_INT4_W4A8=1 is set. By default they run W4A16, the dequantized weights
    within bf16 rounding: on SmolLM2-135M W4G64, W4A8 served a perplexity 2.7% above the dequantized
    weights' (tests/test_real_model.py), while W4A16 runs at about bf16's speed on an AMX Xeon
    (benchmarks/results/cpu-kernel-table-amx-1-thread-v2.md)."""
    return (torch.cpu._is_amx_tile_supported() and act_dtype == torch.bfloat16
            and os.environ.get(W4A8_SETTING) == "1")


@contextlib.contextmanager
def _w4a8_off():
    """CPUWNA16 reads vLLM's W4A8 setting once, while preparing a layer. Setting it as an attribute of
    `vllm.envs` (which wins over that module's lazy lookup, cached or not) prepares the layer for the W4A16
    path with the ISA it would otherwise pick (AMX tiles where the CPU has them). An earlier version hid
    AMX from the whole preparation instead, and so also sent W4A16 to its AVX-512 micro-kernel: 0.2x a
    bf16 GEMM at 64 rows on an AMX Xeon instead of about 1x."""
    import vllm.envs as envs

    had = "VLLM_CPU_INT4_W4A8" in vars(envs)
    saved = vars(envs).get("VLLM_CPU_INT4_W4A8")
    envs.VLLM_CPU_INT4_W4A8 = False
    try:
        yield
    finally:
        if had:
            envs.VLLM_CPU_INT4_W4A8 = saved
        else:
            del envs.VLLM_CPU_INT4_W4A8


class VllmMixedPrecisionIn4Bits(VllmMixedPrecision):
    """2- and 3-bit layers through vLLM's 4-bit kernels, their integers in 4-bit containers (exact; the
    kernel reads 4 bits per weight)."""

    name = "vllm_4bit"
    container_bits = 4

    @classmethod
    def can_implement(cls, g: LayerGeometry) -> tuple[bool, str | None]:
        if g.spec.bits >= 4:
            return False, f"only 2- and 3-bit layers go into 4-bit containers (this one has {g.spec.bits} bits)"
        return super().can_implement(g)

    def _packed_for_kernel(self, layer) -> PackedLinear:
        from signround_vllm.layouts import widen_to_4_bits

        return widen_to_4_bits(_packed_from_layer(layer, self.g.spec))


class CpuInt4Pack:
    """CPU: PyTorch's int4-pack kernel for decode-sized batches, dequantized tiles into a GEMM beyond
    (`signround_vllm.cpu_int4`, one copy of the weights; 2/3-bit layers in 4-bit containers). The
    kernel's per-group table is in the activation dtype (see that module for the numerics)."""

    name = "cpu_int4"
    exact = False

    def __init__(self, geometry: LayerGeometry):
        self.g = geometry
        usable, self.kernel_off_reason = cpu_int4.int4pack_kernel_usable()
        self.max_rows = 0 if self.exact or not usable else cpu_int4.max_rows_for(torch.get_num_threads())

    @staticmethod
    def can_implement(g: LayerGeometry) -> tuple[bool, str | None]:
        if g.device.type != "cpu":
            return False, f"the int4-pack kernel is PyTorch's CPU kernel (layer is on {g.device.type})"
        if g.act_dtype not in cpu_int4.ACT_DTYPES:
            return False, f"activation dtype {g.act_dtype} (supported: bfloat16, float16)"
        return cpu_int4.can_hold(g.spec, g.in_features, g.out_features)

    def describe(self) -> str:
        if self.exact:
            return "dequantized tiles (float32 scales) + GEMM at every batch size"
        if self.max_rows == 0:
            return f"dequantized tiles + GEMM at every batch size (int4-pack kernel off: {self.kernel_off_reason})"
        return f"int4-pack kernel up to {self.max_rows} rows, dequantized tiles + GEMM beyond"

    def prepare(self, layer) -> None:
        w = cpu_int4.to_int4pack(_packed_from_layer(layer, self.g.spec), self.g.act_dtype, exact=self.exact)
        _drop_packed_params(layer)
        layer.register_parameter("int4_weight", torch.nn.Parameter(w.packed, requires_grad=False))
        layer.register_parameter("int4_scale_offset", torch.nn.Parameter(w.scale_offset, requires_grad=False))
        self.group_size = w.group_size

    def apply(self, layer, x, bias=None):
        return torch.ops.signround.int4pack_linear(x, layer.int4_weight, layer.int4_scale_offset, bias,
                                                   self.group_size, self.max_rows)


class CpuInt4PackExact(CpuInt4Pack):
    """The same packed weights with float32 scales, through dequantized tiles at every batch size:
    each weight equals the format's dequantized weight rounded once to the activation dtype
    (slower at decode; chosen only when forced)."""

    name = "cpu_int4_exact"
    exact = True


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


CANDIDATES = {cls.name: cls for cls in (VllmMixedPrecision, TritonDequantGemm, VllmMixedPrecisionIn4Bits,
                                         CpuInt4Pack, CpuInt4PackExact, DenseDequantized)}
# The order candidates are tried in, by device type; a forced candidate is tried alone. On CUDA,
# vLLM's kernels lead wherever one takes the layer's own width (published figures: Machete and Marlin
# run 4-bit GEMMs near memory speed at small batches); ours takes the rest, including 2/3-bit layers
# when Humming is absent, since it reads 2 or 3 bits per weight where containers read 4. On CPU,
# the int4-pack path leads (measured on a 2-core Zen 4: 3-5x a bf16 GEMM at batch 1 where vLLM's
# CPUWNA16 kernel was at par, and no slower than CPUWNA16 at larger batches: see cpu_int4);
# vLLM's kernel takes the layers it cannot hold. On CPUs with AMX, bf16 GEMMs run on AMX tiles and
# vLLM's CPUWNA16 leads: W4A16 by default, about a bf16 GEMM's speed at every batch size, where the tiles
# of cpu_int4 run 0.3-0.55x from 16 rows on; cpu_int4 (forced) is 2.8x bf16 per block at M = 1 there, for
# batch-1 latency; W4A8 when opted in (cpu_w4a8), 3.9x at M = 1 (benchmarks/results/cpu-kernel-table-amx*.md).
ORDER = {"cuda": ("vllm", "triton", "vllm_4bit", "dense"), "cpu": ("cpu_int4", "vllm", "vllm_4bit", "dense"),
         "cpu_amx": ("vllm", "vllm_4bit", "cpu_int4", "dense")}
FORCE_SETTING = "SIGNROUND_KERNEL"
# Mixture-of-experts layers have their own candidates and order (signround_vllm.moe). The setting forces
# them when it names one of these: "triton" and "dense" force both kinds of layer, "vllm_cpu_int4" the
# experts only. On CUDA our Triton fused-MoE kernel leads (vLLM's own int4 MoE kernels would need a
# repack like the linear layers' and have not been wired in).
MOE_ORDER = {"cuda": ("triton", "dense"), "cpu": ("vllm_cpu_int4", "dense")}
MOE_KERNELS = ("triton", "vllm_cpu_int4", "dense")
_logged: set[tuple] = set()


def default_order(device_type: str) -> tuple[str, ...]:
    if device_type == "cpu" and torch.cpu._is_amx_tile_supported():
        return ORDER["cpu_amx"]
    return ORDER.get(device_type, ("dense",))


def choose_kernel(g: LayerGeometry, forced: str | None = None, order: tuple[str, ...] | None = None):
    """The first candidate that can serve `g`; ValueError listing every reason if none can.

    forced: a candidate name (the $SIGNROUND_KERNEL setting): only it is tried. order: the
    names to try otherwise (default: `default_order` for the layer's device type).
    """
    from vllm.logger import init_logger

    logger = init_logger("vllm.signround")
    if forced in MOE_KERNELS and forced not in CANDIDATES:
        forced = None  # names an expert kernel: linear layers choose as usual
    if forced:
        if forced not in CANDIDATES:
            raise ValueError(f"{FORCE_SETTING}={forced!r} names no SignRound kernel; choose one of "
                             f"{list(CANDIDATES)} (linear layers) or {list(MOE_KERNELS)} (mixture-of-experts layers)")
        names = (forced,)
    else:
        names = order or default_order(g.device.type)
    if g.device.type == "cpu":
        # vLLM's AMX kernels (CPUWNA16's W4A16 GEMM, attention) use tiles without asking Linux for them
        cpu_int4.request_amx_tile_permission()
    reasons = []
    for name in names:
        cls = CANDIDATES[name]
        ok, why = cls.can_implement(g)
        if ok:
            kernel = cls(g)
            key = (name, g.spec, tuple(reasons), forced)
            if key not in _logged:
                _logged.add(key)
                if cls is DenseDequantized and not forced:
                    logger.warning("SignRound %s layers (e.g. %s): no packed kernel fits, so weights are "
                                   "dequantized to %s at load (no memory saving). Reasons: %s",
                                   g.spec.short_name(), g.name, g.act_dtype, "; ".join(reasons))
                else:
                    how = f"forced by {FORCE_SETTING}={forced}" if forced else "chosen"
                    underneath = f" = {kernel.describe()}" if hasattr(kernel, "describe") else ""
                    logger.info("SignRound %s layers (e.g. %s) use kernel '%s'%s (%s)", g.spec.short_name(),
                                g.name, name, underneath, how)
            return kernel
        reasons.append(f"{name}: {why}")
    forced_note = f" (forced by {FORCE_SETTING}={forced})" if forced else ""
    raise ValueError(f"{g.name}: no kernel can serve {g.spec.short_name()} with in_features={g.in_features}, "
                     f"out_features={g.out_features}, dtype={g.act_dtype} on {g.device.type}{forced_note}:\n  "
                     + "\n  ".join(reasons))
