"""The tuning step's fake quantization: quant_core.quantize_weight's dequantized weight, with a
hand-written backward.

Autograd through quantize_weight records about forty weight-sized operations per layer and step (and
the tuner then recomputed them under checkpointing to save memory); on a CPU they took about half of
each step (SmolLM2 block, 4 x 256 tokens: 118 ms per step before, 84 ms after, 65 ms compiled). Here the forward is eight weight-sized passes, the
backward recomputes the integers from the saved per-group scale and zero (nothing weight-sized is kept
between the two) and needs about a dozen, and the weight's per-group min and max, which never change
while a block is tuned, are taken once per block (`FrozenWeight`).

The values are quantize_weight's exactly (the same operations in the same order); the gradients are its
autograd gradients (straight-through rounding, clamp masks as torch's clamp backward) up to the order of
floating-point sums. tests/test_quant_core.py checks both.
"""
from __future__ import annotations

import dataclasses

import torch

from signround_vllm.format import LayerQuantSpec
from offline_tuner.compiling import CompiledOrEager
from offline_tuner.quant_core import MAX_SCALE_MAGNITUDE, MIN_SCALE_MAGNITUDE


@dataclasses.dataclass(frozen=True)
class FrozenWeight:
    """A weight viewed as [R, K // G, G] float32 groups, with each group's max (>= 0) and min (<= 0)."""

    groups: torch.Tensor
    group_max: torch.Tensor  # [R, K // G]
    group_min: torch.Tensor
    spec: LayerQuantSpec
    shape: torch.Size  # the parameter's own shape ([N, K], or [experts, N, K])

    @classmethod
    def of(cls, w: torch.Tensor, spec: LayerQuantSpec) -> "FrozenWeight":
        k = w.shape[-1]
        g = spec.effective_group_size(k)
        groups = w.detach().float().reshape(-1, k // g, g)
        return cls(groups, groups.amax(-1).clamp(min=0), groups.amin(-1).clamp(max=0), spec, w.shape)


def fake_quantize(frozen: FrozenWeight, rounding_offset: torch.Tensor, max_scale: torch.Tensor,
                  min_scale: torch.Tensor, dtype: torch.dtype = torch.float32, compiled: bool = False) -> torch.Tensor:
    """The dequantized weight in the parameter's shape and `dtype`; differentiable in rounding_offset
    [R, K], max_scale and min_scale [R, K // G]. compiled: the weight-sized passes through torch.compile."""
    return _FakeQuantize.apply(frozen, rounding_offset, max_scale, min_scale, dtype, compiled)


def _scale_and_zero(frozen: FrozenWeight, max_scale, min_scale):
    """quant_core.group_scales_and_zeros on the precomputed group extremes (values only)."""
    spec = frozen.spec
    wmax, wmin = frozen.group_max * max_scale, frozen.group_min * min_scale
    if spec.sym:
        raw = -torch.where(wmin.abs() > wmax, wmin, wmax) / spec.sym_zero_point
    else:
        raw = (wmax - wmin) / spec.max_int
    floored = torch.where(raw.abs() < MIN_SCALE_MAGNITUDE,
                          torch.where(raw < 0, -MIN_SCALE_MAGNITUDE, MIN_SCALE_MAGNITUDE), raw)
    scale = floored.clamp(-MAX_SCALE_MAGNITUDE, MAX_SCALE_MAGNITUDE).to(torch.float16).float()
    if spec.sym:
        zero_unclamped = None
        zero = torch.full_like(scale, float(spec.sym_zero_point))
    else:
        zero_unclamped = torch.round(-wmin / scale)
        zero = zero_unclamped.clamp(0, spec.max_int)
    return raw, scale, zero, zero_unclamped, wmax, wmin


def _dequantize(groups, offset, scale, zero, max_int: int, dtype: torch.dtype) -> torch.Tensor:
    """Weight-sized forward: (clamp(round(w / s + V) + z, 0, max_int) - z) * s in `dtype`. In place on one
    fresh tensor (eager runs each operation as its own pass; compiled, it is one loop either way)."""
    q = (groups / scale).add_(offset).round_().add_(zero).clamp_(0, max_int)
    return q.sub_(zero).mul_(scale).to(dtype)


def _gradient_sums(grad, groups, offset, scale, zero, max_int: int):
    """Weight-sized backward: the offset's gradient g * s * m (m: where the integer clamp passes it) and the
    per-group sums the scale and zero point need: sum g * (q - z), sum g * m * w, sum g * m, sum g."""
    g = grad.float()
    q = (groups / scale).add_(offset).round_().add_(zero)
    g_inside = g * ((q >= 0) & (q <= max_int))
    g_q = (q.clamp_(0, max_int).sub_(zero).mul_(g)).sum(-1)
    return g_inside * scale, g_q, (g_inside * groups).sum(-1), g_inside.sum(-1), g.sum(-1)


_KERNELS = {False: (_dequantize, _gradient_sums)}


def kernels(compiled: bool):
    """The two weight-sized passes, eager or fused by torch.compile (5-10x faster on a CPU; one compile of a
    few seconds per process serves every shape and bit width)."""
    if compiled not in _KERNELS:
        _KERNELS[compiled] = (CompiledOrEager(_dequantize, dynamic=True), CompiledOrEager(_gradient_sums, dynamic=True))
    return _KERNELS[compiled]


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, frozen: FrozenWeight, offset, max_scale, min_scale, dtype, compiled):
        raw, scale, zero, zero_unclamped, wmax, wmin = _scale_and_zero(frozen, max_scale, min_scale)
        dequantize, _ = kernels(compiled)
        out = dequantize(frozen.groups, offset.reshape(frozen.groups.shape), scale.unsqueeze(-1),
                         zero.unsqueeze(-1), frozen.spec.max_int, dtype).reshape(frozen.shape)
        ctx.frozen, ctx.compiled = frozen, compiled
        ctx.save_for_backward(offset, raw, scale, zero,  # symmetric: no zero to clamp, scale stands in (unused)
                              zero_unclamped if zero_unclamped is not None else scale, wmax, wmin)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        frozen: FrozenWeight = ctx.frozen
        spec = frozen.spec
        offset, raw, scale, zero, zero_unclamped, wmax, wmin = ctx.saved_tensors
        _, gradient_sums = kernels(ctx.compiled)
        g_offset, g_q, g_inside_w, g_inside, g_all = gradient_sums(
            grad_out.reshape(frozen.groups.shape), frozen.groups, offset.reshape(frozen.groups.shape),
            scale.unsqueeze(-1), zero.unsqueeze(-1), spec.max_int)
        # d out / d scale = (q - z) directly, and - m * w / s^2 * s through x = w / s + V.
        g_scale = g_q - g_inside_w / scale
        g_raw_passes = raw.abs() >= MIN_SCALE_MAGNITUDE  # the floor to the smallest float16 scale
        if spec.sym:
            g_raw = g_scale * g_raw_passes
            g_largest = -g_raw / spec.sym_zero_point
            min_wins = wmin.abs() > wmax
            g_wmax, g_wmin = torch.where(min_wins, 0.0, g_largest), torch.where(min_wins, g_largest, 0.0)
        else:
            # The zero point, straight through its rounding and within its clamp: z = -wmin / s.
            g_zero = (g_inside - g_all) * scale
            g_zero = g_zero * ((zero_unclamped >= 0) & (zero_unclamped <= spec.max_int))
            g_scale = g_scale + g_zero * wmin / (scale * scale)
            g_raw = g_scale * g_raw_passes
            g_wmax = g_raw / spec.max_int
            g_wmin = -g_raw / spec.max_int - g_zero / scale
        return (None, g_offset.reshape(offset.shape), g_wmax * frozen.group_max, g_wmin * frozen.group_min,
                None, None)
