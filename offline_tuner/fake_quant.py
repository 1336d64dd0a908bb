"""The tuning step's fake quantization: quant_core.quantize_weight's dequantized weight, with a
hand-written backward.

Autograd through quantize_weight records about forty weight-sized operations per layer and step (and
the tuner then recomputed them under checkpointing to save memory); on a CPU they took about half of
each step (SmolLM2 block, 4 x 256 tokens: 118 ms per step before, about 90 ms after, 67 ms compiled).
Here the forward is eight weight-sized passes and the backward, which recomputes the integers from the
saved per-group scale and zero (nothing weight-sized is kept between the two), about a dozen; the
weight's per-group min and max, which never change while a block is tuned, are taken once per block
(`FrozenWeight`). Only the small per-group chain from the clipping factors to the scale and zero point
goes through autograd, on quant_core.scales_from_extremes, so the scale rule is written once; a block's
weights of one setting share one such chain (`fake_quantize_many`).

The values are quantize_weight's exactly (the same operations in the same order); the gradients are its
autograd gradients (straight-through rounding, clamp masks as torch's clamp backward) up to the order of
floating-point sums. tests/test_quant_core.py checks both.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from signround_vllm.format import LayerQuantSpec
from offline_tuner.compiling import CompiledOrEager
from offline_tuner.quant_core import scales_from_extremes


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
    return fake_quantize_many([frozen], [(rounding_offset, max_scale, min_scale)], dtype, compiled)[0]


def fake_quantize_many(frozen: Sequence[FrozenWeight], tunables: Sequence[Sequence[torch.Tensor]],
                       dtype: torch.dtype = torch.float32, compiled: bool = False) -> list[torch.Tensor]:
    """fake_quantize of several weights (a block's), each with its (rounding_offset, max_scale, min_scale).

    The scale rule is elementwise per group, so the groups of all the weights with one setting go through it
    as one flat vector: one short chain of small operations per setting and step, forward and backward,
    instead of one per weight (on a CPU that chain took longer than the weight-sized passes)."""
    out: list[torch.Tensor] = [None] * len(frozen)  # type: ignore[list-item]
    by_spec: dict[LayerQuantSpec, list[int]] = {}
    for i, f in enumerate(frozen):
        by_spec.setdefault(f.spec, []).append(i)
    for spec, members in by_spec.items():
        sizes = [frozen[i].group_max.numel() for i in members]
        clipped_max = torch.cat([(frozen[i].group_max * tunables[i][1]).reshape(-1) for i in members])
        clipped_min = torch.cat([(frozen[i].group_min * tunables[i][2]).reshape(-1) for i in members])
        scale, zero = scales_from_extremes(clipped_max, clipped_min, spec)
        zeros = zero.split(sizes) if zero is not None else [None] * len(members)
        for i, s, z in zip(members, scale.split(sizes), zeros):
            groups = frozen[i].group_max.shape
            out[i] = _FakeQuantize.apply(frozen[i], tunables[i][0], s.view(groups),
                                         z.view(groups) if z is not None else None, dtype, compiled)
    return out


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
    """The weight-sized passes by hand, given each group's scale and zero point (None: symmetric). The small
    chain from the clipping factors to those stays with autograd, on quant_core.scales_from_extremes (see
    fake_quantize_many), so the scale rule is written once."""

    @staticmethod
    def forward(ctx, frozen: FrozenWeight, offset, scale, zero, dtype, compiled):
        zero_used = zero if zero is not None else torch.full_like(scale, float(frozen.spec.sym_zero_point))
        dequantize, _ = kernels(compiled)
        out = dequantize(frozen.groups, offset.reshape(frozen.groups.shape), scale.unsqueeze(-1),
                         zero_used.unsqueeze(-1), frozen.spec.max_int, dtype).reshape(frozen.shape)
        ctx.frozen, ctx.compiled = frozen, compiled
        ctx.save_for_backward(offset, scale, zero_used)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        frozen: FrozenWeight = ctx.frozen
        offset, scale, zero = ctx.saved_tensors
        _, gradient_sums = kernels(ctx.compiled)
        g_offset, g_q, g_inside_w, g_inside, g_all = gradient_sums(
            grad_out.reshape(frozen.groups.shape), frozen.groups, offset.reshape(frozen.groups.shape),
            scale.unsqueeze(-1), zero.unsqueeze(-1), frozen.spec.max_int)
        # The loss's gradients in each group's scale and zero point as free inputs: d out / d scale is (q - z)
        # directly and - m * w / s^2 * s through x = w / s + V; d out / d zero is s * (m - 1).
        g_scale = g_q - g_inside_w / scale if ctx.needs_input_grad[2] else None
        g_zero = (g_inside - g_all) * scale if ctx.needs_input_grad[3] else None
        return None, g_offset.reshape(offset.shape), g_scale, g_zero, None, None
