"""Mixed bits to a budget: per-layer settings whose average stored bits per weight meet a target.

Two parts:
- `allocate` (pure): given, for each group of layers, the storage cost and the error of each candidate
  setting, choose one setting per group so the total cost is at most the budget and the summed error
  is small. Greedy steps along each group's lower convex hull (best error saved per bit first), then a
  final fill with any option that still fits; the result is never worse, in summed error, than the
  best uniform setting that fits the budget.
- `measure_sensitivity` (driver): the error of a group at a setting is the error of its decoder block's
  output when only that group is rounded to nearest at that setting, on a few calibration windows of the
  full-precision stream (blocks loaded one at a time, as for tuning), relative to the output's own size
  token by token. Relative, because an error early in the network is carried, and grows, through
  every later block while the residual stream itself grows: absolute errors sent SmolLM2-135M's first
  blocks to 2 bits and its 3.5-bit round-to-nearest perplexity to 5354 (uniform W3G64: 57).

Candidates of both kinds, with and without zero points, by default: a symmetric group costs 8 bits less,
and the choice spends that on more bits where they count (chosen on the selection texts,
benchmarks/results/quality-selection-mixed*.md). Scoring each setting from the clipping search where the
tuner searches it, instead of round-to-nearest, was tried there too: a wash, and a slower pass.

A group is what vLLM must serve with one setting: layers reading the very same input tensor
(q/k/v, gate/up; vLLM fuses exactly such layers) and every expert of one fused expert parameter.
Groups are found by watching the block run, not from a per-family table.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import torch

from signround_vllm.format import (SUPPORTED_BITS, LayerQuantSpec, SignRoundConfig, SignRoundFormatError,
                                   bits_per_weight, dequantize_ints)
from offline_tuner.errors import TunerInputError
from offline_tuner.events import Progress
from offline_tuner.plan import LayerPlan, QuantPlan

WITHIN_BITS = 0.05  # the allocation aims to land this close below the budget
KINDS = {"asym": False, "sym": True}  # --kind-choices names -> LayerQuantSpec.sym


@dataclasses.dataclass(frozen=True)
class Allocation:
    """What the user asked for: `--avg-bits`, `--bit-choices`, `--group-choices`."""

    avg_bits: float
    bit_choices: tuple[int, ...] = (2, 3, 4, 8)
    group_choices: tuple[int, ...] = (32, 64, 128)
    kind_choices: tuple[str, ...] = ("asym", "sym")  # among KINDS: with zero points or without
    n_windows: int = 4  # calibration windows for the sensitivity pass (one block forward per group and setting)
    seq_len: int = 256

    def candidates(self) -> list[LayerQuantSpec]:
        bad_bits = [b for b in self.bit_choices if b not in SUPPORTED_BITS]
        if bad_bits or not self.bit_choices:
            raise TunerInputError(f"--bit-choices {list(self.bit_choices)}: choose among {list(SUPPORTED_BITS)}")
        if not self.kind_choices or any(k not in KINDS for k in self.kind_choices):
            raise TunerInputError(f"--kind-choices {list(self.kind_choices)}: choose among {list(KINDS)}")
        try:
            return [LayerQuantSpec(b, g, KINDS[k]) for k in dict.fromkeys(self.kind_choices)
                    for b in sorted(set(self.bit_choices)) for g in sorted(set(self.group_choices))]
        except SignRoundFormatError as e:
            raise TunerInputError(f"--group-choices {list(self.group_choices)}: {e}") from None


@dataclasses.dataclass
class Group:
    """Layers that must share one setting, with each candidate setting's storage cost and measured error."""

    layers: tuple[LayerPlan, ...]  # stored layers
    options: list[LayerQuantSpec]
    costs: list[float]  # stored bits of all the group's weights at each option
    errors: list[float] = dataclasses.field(default_factory=list)

    @property
    def weights(self) -> int:
        return sum(lp.in_features * lp.out_features for lp in self.layers)


def group_costs(layers: Sequence[LayerPlan], options: Sequence[LayerQuantSpec]) -> list[float]:
    return [float(sum(lp.in_features * lp.out_features * bits_per_weight(s, lp.in_features) for lp in layers))
            for s in options]


# ----------------------------------------------------------------------------
# The choice (pure)
# ----------------------------------------------------------------------------
def allocate(costs: Sequence[Sequence[float]], errors: Sequence[Sequence[float]], budget: float) -> list[int]:
    """One option index per group, total cost <= budget. Raises ValueError if even the cheapest options
    together exceed the budget."""
    n = len(costs)
    cheapest = [min(range(len(c)), key=lambda j, c=c, e=errors[i]: (c[j], e[j])) for i, c in enumerate(costs)]
    if sum(costs[i][j] for i, j in enumerate(cheapest)) > budget * (1 + 1e-12):
        raise ValueError("the budget is below the cheapest options")
    results = [_fill(costs, errors, budget, _greedy_on_hulls(costs, errors, budget, cheapest))]
    n_options = {len(c) for c in costs}
    if len(n_options) == 1:  # the same options everywhere: also start from each uniform choice that fits
        for j in range(n_options.pop()):
            uniform = [j] * n
            if sum(costs[i][j] for i in range(n)) <= budget * (1 + 1e-12):
                results.append(_fill(costs, errors, budget, uniform))
    return min(results, key=lambda choice: (sum(errors[i][j] for i, j in enumerate(choice)),
                                            -sum(costs[i][j] for i, j in enumerate(choice))))


def _hull(cost: Sequence[float], err: Sequence[float]) -> list[int]:
    """Indices on the lower convex hull of (cost, error), cheapest first, each strictly better."""
    order = sorted(range(len(cost)), key=lambda j: (cost[j], err[j]))
    pareto = []
    for j in order:
        if not pareto or err[j] < err[pareto[-1]]:
            if pareto and cost[j] == cost[pareto[-1]]:
                continue
            pareto.append(j)
    hull: list[int] = []
    for j in pareto:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the segment a -> j: drop it
            if (err[a] - err[b]) * (cost[j] - cost[a]) <= (err[a] - err[j]) * (cost[b] - cost[a]):
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


def _greedy_on_hulls(costs, errors, budget, start) -> list[int]:
    choice = list(start)
    hulls = [_hull(c, e) for c, e in zip(costs, errors)]
    pos = []
    for i, h in enumerate(hulls):  # the hull point at or just below the start's cost
        k = max([k for k, j in enumerate(h) if costs[i][j] <= costs[i][choice[i]]], default=0)
        pos.append(k)
        choice[i] = h[k]
    spent = sum(costs[i][j] for i, j in enumerate(choice))
    blocked = set()
    while True:
        best, best_gain = None, 0.0
        for i, h in enumerate(hulls):
            if i in blocked or pos[i] + 1 >= len(h):
                continue
            a, b = h[pos[i]], h[pos[i] + 1]
            gain = (errors[i][a] - errors[i][b]) / (costs[i][b] - costs[i][a])
            if gain > best_gain:
                best, best_gain = i, gain
        if best is None:
            return choice
        a, b = hulls[best][pos[best]], hulls[best][pos[best] + 1]
        if spent + costs[best][b] - costs[best][a] <= budget * (1 + 1e-12):
            spent += costs[best][b] - costs[best][a]
            pos[best] += 1
            choice[best] = b
        else:
            blocked.add(best)  # its later steps cost more still


def _fill(costs, errors, budget, choice) -> list[int]:
    """Spend what is left: repeatedly take the single change (any option of any group) that lowers the
    error most per extra bit and still fits. Options a group lacks are padded as never chosen."""
    width = max(len(c) for c in costs)
    cost = torch.full((len(costs), width), float("inf"), dtype=torch.float64)
    err = torch.full((len(costs), width), float("inf"), dtype=torch.float64)
    for i, (c, e) in enumerate(zip(costs, errors)):
        cost[i, :len(c)] = torch.tensor(c, dtype=torch.float64)
        err[i, :len(e)] = torch.tensor(e, dtype=torch.float64)
    rows = torch.arange(len(costs))
    now = torch.tensor(choice)
    limit = budget * (1 + 1e-12)
    while True:
        extra = cost - cost[rows, now][:, None]
        saved = err[rows, now][:, None] - err
        spent = float(cost[rows, now].sum())
        ok = (saved > 0) & (spent + extra <= limit)
        if not bool(ok.any()):
            return [int(j) for j in now]
        key = torch.where(extra > 0, saved / extra.clamp_min(1e-300), torch.tensor(float("inf"), dtype=torch.float64))
        key = torch.where(ok, key, torch.tensor(-1.0, dtype=torch.float64))
        flat = int(torch.argmax(key))
        now[flat // width] = flat % width


# ----------------------------------------------------------------------------
# Sensitivity (driver) and the resulting config
# ----------------------------------------------------------------------------
@torch.no_grad()
def measure_sensitivity(model, source, windows: torch.Tensor, plan: QuantPlan, candidates: list[LayerQuantSpec],
                        device: torch.device, bf16_autocast: bool, progress: Progress | None = None) -> list[Group]:
    """Each group's block-output error at each candidate setting (see module doc)."""
    from offline_tuner.blockwise import capture_block_calls
    from offline_tuner.memory import return_freed_memory
    from offline_tuner.model_source import release
    from offline_tuner.signround import block_loss, run_block

    blocks = plan.blocks
    calls = capture_block_calls(model, source, blocks, windows, device)
    x = calls.first_inputs
    groups: list[Group] = []
    t0 = time.perf_counter()
    for i in range(len(blocks)):
        block_name, kwargs = blocks.module_name(i), calls.block_kwargs[i]
        params = plan.block_params(i)
        block = source.materialize_module(model, block_name).to(device=device, dtype=torch.float32)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_autocast):
            block_groups, y0 = _fused_groups(block, params, lambda: run_block(block, x[:1], kwargs).float())
            y = torch.cat([y0, *(run_block(block, x[b:b + 1], kwargs).float() for b in range(1, len(x)))])
            for names in block_groups:
                layers = tuple(lp for n in names for lp in params[n])
                options = [s for s in candidates if _fits(s, layers)]
                if not options:
                    raise TunerInputError(_nothing_fits(layers[0], candidates))
                group = Group(layers, options, group_costs(layers, options))
                for spec in options:
                    override = {n: _rounded(block.get_parameter(n), spec) for n in names}
                    err = 0.0
                    for b in range(len(x)):
                        out = run_block(block, x[b:b + 1], kwargs, override).float()
                        err += float(block_loss(out, y[b:b + 1], "token_normalized"))
                    group.errors.append(err / len(x))
                groups.append(group)
        x = y
        release(model, [f"{block_name}.{n}" for n, _ in block.named_parameters()])
        del block
        return_freed_memory()
        if progress:
            progress(f"sensitivity: block {i + 1}/{len(blocks)} ({len(block_groups)} groups x "
                     f"{len(candidates)} settings, {time.perf_counter() - t0:.0f} s elapsed)")
    return groups


def _fits(spec: LayerQuantSpec, layers: Sequence[LayerPlan]) -> bool:
    try:
        for lp in layers:
            spec.check_in_features(lp.in_features, lp.name)
    except SignRoundFormatError:
        return False
    return True


def _rounded(w: torch.Tensor, spec: LayerQuantSpec) -> torch.Tensor:
    """The weights round-to-nearest would store, dequantized (rows rounded a few at a time, so an expert
    weight's float32 intermediates stay small)."""
    from offline_tuner.quant_core import round_to_nearest_in_row_chunks

    q, scale, zero = round_to_nearest_in_row_chunks(w.reshape(-1, w.shape[-1]), spec)
    rows = dequantize_ints(q.t(), scale.t(), zero.t() if zero is not None else None, spec).t()
    return rows.to(w.dtype).reshape(w.shape)


def _fused_groups(block: torch.nn.Module, params: dict, run) -> tuple[list[list[str]], torch.Tensor]:
    """The block's quantized parameters grouped as vLLM fuses them, seen while `run()` runs the block (its
    output is returned too): linear layers that read the very same input tensor share a group; an expert
    parameter (all experts of a layer) is a group of its own."""
    seen: dict[str, torch.Tensor] = {}  # held, so no input is freed and its id reused during the forward
    hooks = []
    for name in params:
        owner = block.get_submodule(name.rpartition(".")[0])
        if isinstance(owner, torch.nn.Linear):
            hooks.append(owner.register_forward_pre_hook(
                lambda m, args, _n=name: seen.__setitem__(_n, args[0]) if args else None))
    try:
        out = run()
    finally:
        for h in hooks:
            h.remove()
    groups: dict[object, list[str]] = {}
    for name in params:
        key = ("input", id(seen[name])) if name in seen else ("param", name)
        groups.setdefault(key, []).append(name)
    return list(groups.values()), out


def check_budget(plan: QuantPlan, request: Allocation) -> None:
    """Refuse up front a budget below what the cheapest fitting choice of every layer costs."""
    candidates = request.candidates()
    weights = bits = 0.0
    for lp in plan.layers.values():
        fitting = [s for s in candidates if _fits(s, [lp])]
        if not fitting:
            raise TunerInputError(_nothing_fits(lp, candidates))
        weights += lp.in_features * lp.out_features
        bits += min(group_costs([lp], fitting))
    if weights and bits / weights > request.avg_bits:
        raise TunerInputError(_below_cheapest(request, bits / weights))


def _nothing_fits(lp: LayerPlan, candidates: list[LayerQuantSpec]) -> str:
    return (f"{lp.name}: none of the candidate settings {[s.short_name() for s in candidates]} fits its "
            f"in_features {lp.in_features}; add a group size that divides it")


def _below_cheapest(request: Allocation, cheapest: float) -> str:
    return (f"--avg-bits {request.avg_bits}: below the cheapest choice for this model ({cheapest:.3f} bits per "
            f"weight, scales and zero points included, with --bit-choices {list(request.bit_choices)} "
            f"--group-choices {list(request.group_choices)}); raise it or allow fewer bits / larger groups")


def allocated_config(config: SignRoundConfig, groups: list[Group], request: Allocation) -> tuple[SignRoundConfig, dict]:
    """The config with every planned layer's allocated setting (the most common one, by weights, as the
    default; the rest as layer overrides), and a report of the allocation."""
    total_weights = sum(g.weights for g in groups)
    budget = request.avg_bits * total_weights
    cheapest = sum(min(g.costs) for g in groups) / total_weights
    richest = sum(max(g.costs) for g in groups) / total_weights
    try:
        choice = allocate([g.costs for g in groups], [g.errors for g in groups], budget)
    except ValueError:
        raise TunerInputError(_below_cheapest(request, cheapest)) from None
    chosen = {lp.name: g.options[j] for g, j in zip(groups, choice) for lp in g.layers}
    by_weight: dict[LayerQuantSpec, int] = {}
    for g, j in zip(groups, choice):
        by_weight[g.options[j]] = by_weight.get(g.options[j], 0) + g.weights
    default = max(by_weight, key=by_weight.get)
    overrides = {**{k: v for k, v in config.layer_overrides.items() if k not in chosen},
                 **{name: spec for name, spec in chosen.items() if spec != default}}
    achieved = sum(g.costs[j] for g, j in zip(groups, choice)) / total_weights
    report = {
        "target_bits": request.avg_bits, "achieved_bits": round(achieved, 4), "within": WITHIN_BITS,
        "range_bits": [round(cheapest, 4), round(richest, 4)], "weights": total_weights,
        "candidates": [s.short_name() for s in request.candidates()],
        "settings_by_weight_share": {s.short_name(): round(w / total_weights, 4)
                                     for s, w in sorted(by_weight.items(), key=lambda kv: -kv[1])},
        "groups": [{"layers": [lp.name for lp in g.layers], "setting": g.options[j].short_name(),
                    "errors": {s.short_name(): e for s, e in zip(g.options, g.errors)}}
                   for g, j in zip(groups, choice)],
    }
    return dataclasses.replace(config, default=default, layer_overrides=overrides), report
