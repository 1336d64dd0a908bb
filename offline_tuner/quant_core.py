"""The numeric core: group-wise affine quantization with a learnable rounding offset.

Pure functions of tensors. Round-to-nearest is the special case
``rounding_offset = 0, max_scale = min_scale = 1``; SignRound tunes all three.

Shapes: a linear weight ``w`` is ``[N, K]`` (PyTorch layout); with group size
``G`` there are ``K // G`` groups per output row, so per-group tensors are
``[N, K // G]`` and the rounding offset is ``[N, K]``.
"""
from __future__ import annotations

import torch

from signround_vllm.format import LayerQuantSpec

# Smallest |scale| we store: the smallest normal float16 (scales are stored as float16).
MIN_SCALE_MAGNITUDE = 2.0 ** -14
MAX_SCALE_MAGNITUDE = 65504.0


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest; the gradient passes straight through."""
    return x + (torch.round(x) - x).detach()


def _as_float16_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to the float16 value that will be stored; the gradient passes straight through."""
    stored = x.clamp(-MAX_SCALE_MAGNITUDE, MAX_SCALE_MAGNITUDE).to(torch.float16).to(x.dtype)
    return x + (stored - x).detach()


def _floor_magnitude(s: torch.Tensor) -> torch.Tensor:
    """Keep the sign of a scale but lift its magnitude to at least MIN_SCALE_MAGNITUDE."""
    sign = torch.where(s < 0, -1.0, 1.0).to(s.dtype)
    return torch.where(s.abs() < MIN_SCALE_MAGNITUDE, sign * MIN_SCALE_MAGNITUDE, s)


def group_scales_and_zeros(w_groups: torch.Tensor, spec: LayerQuantSpec,
                           max_scale: torch.Tensor | None = None,
                           min_scale: torch.Tensor | None = None):
    """Scale and zero point of each group from its (clipped) min and max.

    w_groups: [N, K // G, G] float32. max_scale / min_scale: [N, K // G] clipping factors
    for the group max / min (1.0 = no clipping). Returns (scale, zero) as [N, K // G]
    float32, scale already rounded to its stored float16 value; zero is None when symmetric.
    """
    wmax = w_groups.amax(dim=-1).clamp(min=0)
    wmin = w_groups.amin(dim=-1).clamp(max=0)
    if max_scale is not None:
        wmax = wmax * max_scale
    if min_scale is not None:
        wmin = wmin * min_scale
    return scales_from_extremes(wmax, wmin, spec)


def scales_from_extremes(wmax: torch.Tensor, wmin: torch.Tensor, spec: LayerQuantSpec):
    """Scale and zero point of each group from its clipped max (>= 0) and min (<= 0), [N, K // G] each; the
    one definition of the rule, differentiable through straight-through rounding."""
    if spec.sym:
        # Full range: the value of largest magnitude maps exactly to -2^(bits-1).
        largest = torch.where(wmin.abs() > wmax, wmin, wmax)
        scale = _as_float16_ste(_floor_magnitude(-largest / spec.sym_zero_point))
        return scale, None
    scale = _as_float16_ste(_floor_magnitude((wmax - wmin) / spec.max_int))
    zero = round_ste(-wmin / scale).clamp(0, spec.max_int)
    return scale, zero


def quantize_weight(w: torch.Tensor, spec: LayerQuantSpec,
                    rounding_offset: torch.Tensor | None = None,
                    max_scale: torch.Tensor | None = None,
                    min_scale: torch.Tensor | None = None):
    """Quantize w [N, K] group-wise.

    Returns (w_dequant [N, K] float32, q [N, K] float32 integers in [0, 2^bits),
    scale [N, K // G], zero [N, K // G] or None). Differentiable in rounding_offset,
    max_scale and min_scale through straight-through rounding.
    """
    n, k = w.shape
    g = spec.effective_group_size(k)
    w_groups = w.float().reshape(n, k // g, g)
    scale, zero = group_scales_and_zeros(w_groups, spec, max_scale, min_scale)
    zero_used = zero if zero is not None else torch.full_like(scale, float(spec.sym_zero_point))
    x = w_groups / scale.unsqueeze(-1)
    if rounding_offset is not None:
        x = x + rounding_offset.reshape(n, k // g, g)
    q = (round_ste(x) + zero_used.unsqueeze(-1)).clamp(0, spec.max_int)
    w_dequant = (q - zero_used.unsqueeze(-1)) * scale.unsqueeze(-1)
    return w_dequant.reshape(n, k), q.reshape(n, k), scale, zero


@torch.no_grad()
def quantize_weight_to_ints(w: torch.Tensor, spec: LayerQuantSpec,
                            rounding_offset: torch.Tensor | None = None,
                            max_scale: torch.Tensor | None = None,
                            min_scale: torch.Tensor | None = None):
    """Like quantize_weight, but returns the integers to store: (q int64 [N, K], scale, zero)."""
    _, q, scale, zero = quantize_weight(w, spec, rounding_offset, max_scale, min_scale)
    return q.round().to(torch.int64), scale, (zero.round().to(torch.int64) if zero is not None else None)


@torch.no_grad()
def round_to_nearest_in_row_chunks(w: torch.Tensor, spec: LayerQuantSpec, max_elements: int = 1 << 22):
    """quantize_weight_to_ints with no offsets or clipping (round-to-nearest), a few rows at a time:
    rows are independent, so the result is the same while the float32 intermediates stay small.
    Returns (q uint8 [N, K], scale float32 [N, K // G], zero uint8 or None)."""
    n, k = w.shape
    rows = max(1, max_elements // k)
    q = torch.empty(n, k, dtype=torch.uint8)
    scales, zeros = [], []
    for start in range(0, n, rows):
        qc, sc, zc = quantize_weight_to_ints(w[start:start + rows].float(), spec)
        q[start:start + rows] = qc.to(torch.uint8)
        scales.append(sc)
        zeros.append(zc.to(torch.uint8) if zc is not None else None)
    return q, torch.cat(scales), (torch.cat(zeros) if zeros[0] is not None else None)


# Clipping factors the search tries: the same factor on a group's max and min, 1.0 = plain min/max. With an
# asymmetric grid a factor above 1 only widens the range past the data, so the search only clips.
CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0, 0.95, ..., 0.5
# The symmetric grid is lopsided: the value of largest magnitude maps exactly onto -2^(bits-1), while the
# other side reaches only 2^(bits-1) - 1 steps, so in a group whose opposite extreme is nearly as large, that
# extreme is clipped. There a larger scale (factor above 1) can be the better trade, so symmetric layers
# search 0.5 to 1.5 coarsely and then refine each group around its best coarse point. Chosen on the selection
# texts (benchmarks/results/quality-selection-symsearch-*.md).
SYM_CLIP_GRID = tuple(0.5 + 0.1 * i for i in range(11))  # 0.5, 0.6, ..., 1.5
SYM_CLIP_REFINE = tuple(0.01 * i for i in range(-5, 6) if i)  # offsets from the best coarse factor
# Bounds of the tuned clipping factors (SignRound's signed steps keep them inside).
CLIP_FACTOR_MIN = 0.0
SYM_CLIP_FACTOR_MAX = 1.5


def clip_factor_max(spec: LayerQuantSpec) -> float:
    """Largest clipping factor a layer of `spec` may use: 1.0 asymmetric, SYM_CLIP_FACTOR_MAX symmetric."""
    return SYM_CLIP_FACTOR_MAX if spec.sym else 1.0


def _weighted_error(w_groups, wmax, wmin, spec, ratio, h):
    """Per group, sum_k h_k * (w_k - q(w)_k)^2 for round-to-nearest with clipping factors `ratio` [R, groups].
    The same arithmetic as quantize_weight (so the same integers), in place on one buffer: the search runs this
    once per grid point, for every layer tuned and every candidate setting of a sensitivity pass."""
    scale, zero = scales_from_extremes(wmax * ratio, wmin * ratio, spec)
    zero = (zero if zero is not None else torch.full_like(scale, float(spec.sym_zero_point))).unsqueeze(-1)
    scale = scale.unsqueeze(-1)
    x = torch.div(w_groups, scale)
    x.round_().add_(zero).clamp_(0, spec.max_int).sub_(zero).mul_(scale).sub_(w_groups).square_()
    return x.mul_(h).sum(-1)


@torch.no_grad()
def search_clipping(w: torch.Tensor, spec: LayerQuantSpec, importance: torch.Tensor | None = None,
                    grid: tuple[float, ...] | None = None, refine: tuple[float, ...] | None = None,
                    max_elements: int = 1 << 22) -> torch.Tensor:
    """Per group, the clipping factor (applied to both the group's max and min) whose round-to-nearest error
    sum_k importance_k * (w_k - q(w)_k)^2 is smallest: first over `grid` (ties keep the factor tried first,
    largest first, but 1.0 before any factor above it, so plain min/max wins unless another factor is strictly
    better), then over the group's best grid factor plus each offset in `refine`. Defaults: CLIP_GRID and no
    refinement for asymmetric layers, SYM_CLIP_GRID and SYM_CLIP_REFINE for symmetric ones. w: [N, K];
    importance: [K] (for example the mean squared input of each channel) or None (all 1).
    Returns [N, K // G] float32 within [CLIP_FACTOR_MIN, clip_factor_max(spec)]."""
    if grid is None:
        grid = SYM_CLIP_GRID if spec.sym else CLIP_GRID
    if refine is None:
        refine = SYM_CLIP_REFINE if spec.sym else ()
    n, k = w.shape
    g = spec.effective_group_size(k)
    groups = k // g
    h = (importance.float().to(w.device) if importance is not None else torch.ones(k, device=w.device))
    h = h.reshape(1, groups, g)
    low, high = CLIP_FACTOR_MIN, clip_factor_max(spec)
    order = sorted((float(r) for r in grid), key=lambda r: (r != 1.0, -r))
    best = torch.ones(n, groups, device=w.device)
    rows = max(1, max_elements // k)
    for start in range(0, n, rows):
        chunk = w[start:start + rows].float().reshape(-1, groups, g)
        wmax, wmin = chunk.amax(dim=-1).clamp(min=0), chunk.amin(dim=-1).clamp(max=0)
        chosen = torch.full((chunk.shape[0], groups), order[0], device=w.device)
        best_err = _weighted_error(chunk, wmax, wmin, spec, chosen, h)

        def keep_if_better(ratio):
            nonlocal chosen, best_err
            err = _weighted_error(chunk, wmax, wmin, spec, ratio, h)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            chosen = torch.where(better, ratio, chosen)

        for r in order[1:]:
            keep_if_better(torch.full_like(chosen, min(max(r, low), high)))
        coarse = chosen  # torch.where makes new tensors, so refining does not move this
        for offset in refine:
            keep_if_better((coarse + offset).clamp(low, high))
        best[start:start + rows] = chosen
    return best
