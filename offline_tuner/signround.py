"""SignRound (arXiv 2309.05516): tune rounding and clipping of each block by signed gradient descent.

The numeric core is `tune_block`: a pure function of one transformer block, its
inputs, the full-precision targets and a frozen `TuneSettings`. `BlockwiseTuner`
is the driver: it captures the first block's inputs once, tunes each block in
turn, and feeds the next block the outputs of the already quantized blocks.

Tuned weights are parameters of the block: a linear layer's [N, K] weight or a mixture-of-experts
block's fused [experts, N, K] expert weight, quantized row by row in groups of G along K (so every
expert of a fused weight gets its own groups). Viewing a weight as R = numel / K rows, the tunables are
  rounding_offset  [R, K]       in [-0.5, 0.5], start 0
  max_scale        [R, K // G]  in [0, 1], start 1 (clips the group max)
  min_scale        [R, K // G]  in [0, 1], start 1 (clips the group min)
Experts are tuned through the block's own routing: an expert that no token reaches gets no gradient.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Mapping

import torch
from torch.func import functional_call

from signround_vllm.format import LayerQuantSpec
from offline_tuner.compiling import COMPILE_CHOICES, CompiledOrEager
from offline_tuner.fake_quant import FrozenWeight, fake_quantize_many
from offline_tuner.quant_core import CLIP_FACTOR_MIN, clip_factor_max, quantize_weight_to_ints, search_clipping

STREAM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LOSSES = ("mse", "token_normalized")
CLIP_SEARCH_CHOICES = ("auto", "on", "off")
# clip_search "auto" searches asymmetric layers of AUTO_CLIP_SEARCH_BITS bits and symmetric layers of
# AUTO_SYM_CLIP_SEARCH_BITS bits. Chosen on the selection texts, never the evaluation texts
# (benchmarks/results/quality-selection-sym-w2g64-{base,clip}.md, -tokennorm{,-clip}.md, -symsearch-*.md,
# -*-w4g64asym-{base,clip}.md): at 2 bits the search lowered perplexity on both texts, by 1-3% at G32 and
# 22-35% at G64 (both seeds); at 3 bits asymmetric it was about 2% better on one text and 2% worse on the
# other; at 4 bits asymmetric 0.3-1.6% lower on three of the four means of two seeds (two recipes, two
# texts) and level on the fourth; symmetric layers, with their own grid that also tries factors above 1
# (quant_core.SYM_CLIP_GRID), gained on both texts.
AUTO_CLIP_SEARCH_BITS = (2, 4)
AUTO_SYM_CLIP_SEARCH_BITS = (2, 3, 4)
# Default steps of the rounding offsets and clipping factors: 1 / iters (the reference algorithm's), decayed
# linearly to 0, but half that for layers of at most SMALL_STEP_MAX_BITS bits that start from the clipping
# search: their start is already near a good point. Chosen on the selection texts, never the evaluation texts
# (benchmarks/results/quality-selection-lr-*.md): half steps were lower on both texts in every run at W3G32 sym
# (both recipes) and W2G32 asym (cpu-demo), all searched layers, and a wash (2.5% worse on one text, 2.2% better
# on the other) at W3G64 asym, which starts from plain min/max; twice the step was 8-9% worse at W3G32 sym.
SMALL_STEP_MAX_BITS = 3


@dataclasses.dataclass(frozen=True)
class TuneSettings:
    """How each block is tuned. Defaults follow the reference algorithm except where the selection texts chose
    otherwise: the loss, the clipping search and the step of searched layers."""

    iters: int = 200
    batch_size: int = 8
    lr: float | None = None  # rounding offset step; None = default_step
    minmax_lr: float | None = None  # clipping factor step; None = default_step
    tune_minmax: bool = True
    seed: int = 42
    # Run the block's matmuls in bf16 while tuning (CUDA, or a CPU with native bf16); tunables,
    # rounding and the loss stay fp32. About 2x faster on a Zen 4 core; the reference does the same.
    bf16_autocast: bool = True
    # dtype in which the two activation streams between blocks are stored (computation stays float32).
    stream_dtype: str = "float32"
    # Start the clipping factors from a per-group search (quant_core.search_clipping, weighted by each input
    # channel's mean squared activation) instead of 1.0: "on" for every layer (with iters 0 the search alone
    # then decides the clipping), "off", or "auto" = only layers of AUTO_CLIP_SEARCH_BITS bits (symmetric
    # ones: AUTO_SYM_CLIP_SEARCH_BITS), and only when tuning (so iters 0 stays round-to-nearest).
    # See searches_clipping.
    clip_search: str = "auto"
    # Calibration windows held back from tuning: each block's tuned weights are kept only if they beat
    # round-to-nearest on these (0: judged on a batch of the tuning windows themselves).
    holdout: int = 0
    # The objective (block_loss): "token_normalized" (each token's error relative to its size), or "mse".
    # Chosen on the selection texts (benchmarks/results/quality-selection-*.md), never the evaluation texts:
    # with "mse" a few tokens with huge activations decide the loss from the middle of the model on, and
    # tuning fits them at the cost of every other token.
    loss: str = "token_normalized"
    # torch.compile of the step (offline_tuner.compiling): "on", "off", or "auto" = where the run is long
    # enough to win back the compile. Tuning driven by tune_block directly reads "auto" as "off".
    compile: str = "auto"

    def __post_init__(self):
        if self.iters < 0:
            raise ValueError(f"iters={self.iters}: must be >= 0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be >= 1")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}: use one of {list(LOSSES)}")
        if self.compile not in COMPILE_CHOICES:
            raise ValueError(f"compile={self.compile!r}: use one of {list(COMPILE_CHOICES)}")
        if self.clip_search not in CLIP_SEARCH_CHOICES:
            raise ValueError(f"clip_search={self.clip_search!r}: use one of {list(CLIP_SEARCH_CHOICES)}")
        if self.holdout < 0:
            raise ValueError(f"holdout={self.holdout}: must be >= 0")
        if self.stream_dtype not in STREAM_DTYPES:
            raise ValueError(f"stream_dtype={self.stream_dtype!r}: use one of {sorted(STREAM_DTYPES)}")

    @property
    def departs_from_rtn(self) -> bool:
        """Whether these settings can give other weights than round-to-nearest (then blocks are run one by
        one on calibration data, and each result is checked against round-to-nearest)."""
        return self.iters > 0 or self.clip_search == "on"

    def searches_clipping(self, spec: LayerQuantSpec) -> bool:
        """Whether a layer quantized as `spec` starts from the clipping search (see clip_search)."""
        if self.clip_search == "auto":
            bits = AUTO_SYM_CLIP_SEARCH_BITS if spec.sym else AUTO_CLIP_SEARCH_BITS
            return self.iters > 0 and spec.bits in bits
        return self.clip_search == "on"

    def default_step(self, spec: LayerQuantSpec) -> float:
        """Step of a layer quantized as `spec` where lr / minmax_lr are not given (see SMALL_STEP_MAX_BITS)."""
        step = 1.0 / max(self.iters, 1)
        return step / 2 if self.searches_clipping(spec) and spec.bits <= SMALL_STEP_MAX_BITS else step

    def offset_lr(self, spec: LayerQuantSpec) -> float:
        return self.lr if self.lr is not None else self.default_step(spec)

    def clip_lr(self, spec: LayerQuantSpec) -> float:
        return self.minmax_lr if self.minmax_lr is not None else self.default_step(spec)


@dataclasses.dataclass
class LayerTunables:
    rounding_offset: torch.Tensor  # [N, K] float32
    max_scale: torch.Tensor  # [N, K // G] float32
    min_scale: torch.Tensor  # [N, K // G] float32

    @classmethod
    def initial(cls, weight: torch.Tensor, spec: LayerQuantSpec, device,
                clip: torch.Tensor | None = None) -> "LayerTunables":
        """Round-to-nearest (no offset, no clipping), or clipping factors `clip` [R, K // G] on max and min."""
        k = weight.shape[-1]
        n = weight.numel() // k
        groups = k // spec.effective_group_size(k)
        max_scale = clip.clone().to(device) if clip is not None else torch.ones(n, groups, device=device)
        return cls(torch.zeros(n, k, device=device), max_scale, max_scale.clone())

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Back to round-to-nearest on the rows selected by the boolean mask `rows` [R]."""
        with torch.no_grad():
            self.rounding_offset[rows] = 0.0
            self.max_scale[rows] = 1.0
            self.min_scale[rows] = 1.0

    def tensors(self) -> list[torch.Tensor]:
        return [self.rounding_offset, self.max_scale, self.min_scale]

    def clone(self) -> "LayerTunables":
        return LayerTunables(*(t.detach().clone() for t in self.tensors()))


@dataclasses.dataclass
class BlockResult:
    tunables: dict[str, LayerTunables]  # by parameter name inside the block
    rtn_loss: float  # loss with zero offsets and no clipping (round-to-nearest)
    best_loss: float  # best loss seen during tuning (on its batch)
    final_rtn_loss: float  # on a fixed evaluation batch: round-to-nearest
    final_tuned_loss: float  # on the same batch: the kept tunables
    best_iter: int
    seconds: float
    fell_back_to_rtn: bool = False


def block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def quantized_weights(weights: Mapping[str, FrozenWeight], specs: Mapping[str, LayerQuantSpec],
                      tunables: Mapping[str, LayerTunables] | None,
                      dtype: torch.dtype = torch.float32, compiled: bool = False) -> dict[str, torch.Tensor]:
    """Fake-quantized value of each tuned parameter, by its name (round-to-nearest where `tunables` is
    None): computed in float32, handed over in `dtype` (bf16 where the block's matmuls run in bf16 anyway,
    so no float32 copy is kept)."""
    names = list(weights)
    chosen = [(tunables[name] if tunables is not None
               else LayerTunables.initial(weights[name].groups.reshape(weights[name].shape), specs[name],
                                          weights[name].groups.device)).tensors() for name in names]
    return dict(zip(names, fake_quantize_many([weights[n] for n in names], chosen, dtype, compiled)))


def run_block(block: torch.nn.Module, x: torch.Tensor, block_kwargs: dict,
              weight_overrides: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    if weight_overrides:
        return block_output(functional_call(block, dict(weight_overrides), (x,), block_kwargs, strict=False))
    return block_output(block(x, **block_kwargs))


def block_loss(out: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """The tuning objective. "mse": mean squared error over all values. "token_normalized": each token's
    mean squared error divided by its target's mean square, then averaged over tokens, so the few tokens
    with huge activations (attention sinks) do not decide the loss alone."""
    err = (out.float() - target.float()) ** 2
    if kind == "mse":
        return torch.mean(err)
    scale = target.float().pow(2).mean(-1, keepdim=True) + 1e-6
    return torch.mean(err.mean(-1, keepdim=True) / scale)


def _block_step_loss(block, overrides, x, target, block_kwargs, kind, device_type, autocast):
    """The block's forward on its fake-quantized weights, and the loss against the targets."""
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        out = run_block(block, x, block_kwargs, overrides)
    return block_loss(out, target, kind)


_LOSS_FNS = {False: _block_step_loss}


def _loss_fn(compiled: bool):
    """_block_step_loss, eager or compiled (one compile per block class and batch shape serves every block:
    the weights are inputs of the graph, not constants)."""
    if compiled not in _LOSS_FNS:
        _LOSS_FNS[compiled] = CompiledOrEager(_block_step_loss)
    return _LOSS_FNS[compiled]


def use_bf16_autocast(settings: TuneSettings, device: torch.device) -> bool:
    """settings.bf16_autocast, where bf16 is native: CUDA, or a CPU whose oneDNN has AVX512-BF16 / AMX
    (elsewhere bf16 is emulated and slower than fp32)."""
    if not settings.bf16_autocast:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def tune_block(block: torch.nn.Module, params: Mapping[str, torch.Tensor], specs: Mapping[str, LayerQuantSpec],
               inputs: torch.Tensor, targets: torch.Tensor, block_kwargs: dict, settings: TuneSettings,
               generator_seed: int, progress: Callable[[int, float], None] | None = None,
               keep_rtn_rows: Mapping[str, torch.Tensor] | None = None,
               importance: Mapping[str, torch.Tensor] | None = None) -> BlockResult:
    """Tune one block. params: the block's weights to quantize, by parameter name inside the block
    ("self_attn.q_proj.weight", "mlp.experts.gate_up_proj"). inputs/targets: [n_samples, seq, hidden], in
    memory or memory-mapped, any float dtype; each batch is moved to the block's device in float32.
    keep_rtn_rows: per parameter, a boolean mask of rows that keep round-to-nearest whatever the tuning
    found (the experts no calibration token was routed to). importance: per parameter, the mean squared
    input of each of its K channels, weighting the clipping search (settings.searches_clipping; 1 where
    absent).

    The block's own weights are left untouched; the result holds the best tunables seen.
    """
    t0 = time.perf_counter()
    device = next(iter(params.values())).device
    weights = {name: FrozenWeight.of(p, specs[name]) for name, p in params.items()}
    tunables = {name: LayerTunables.initial(p, specs[name], device, clip=search_clipping(
                    p.detach().float().reshape(-1, p.shape[-1]), specs[name], (importance or {}).get(name))
                    if settings.searches_clipping(specs[name]) else None) for name, p in params.items()}
    offsets = [t.rounding_offset.requires_grad_() for t in tunables.values()]
    clips = [c.requires_grad_() for t in tunables.values() for c in (t.max_scale, t.min_scale)]
    # Each tunable tensor's step and the bounds its signed steps keep it within, by id.
    step_rule = {}
    for name, t in tunables.items():
        step_rule[id(t.rounding_offset)] = (settings.offset_lr(specs[name]), -0.5, 0.5)
        for c in (t.max_scale, t.min_scale):
            step_rule[id(c)] = (settings.clip_lr(specs[name]), CLIP_FACTOR_MIN, clip_factor_max(specs[name]))
    n_all = inputs.shape[0]
    if settings.holdout and settings.holdout >= n_all:
        raise ValueError(f"holdout={settings.holdout} leaves none of the {n_all} calibration windows for tuning")
    shuffled = torch.randperm(n_all, generator=torch.Generator().manual_seed(generator_seed + 1))
    train_idx = shuffled[settings.holdout:] if settings.holdout else torch.arange(n_all)
    n = len(train_idx)
    bs = min(settings.batch_size, n)
    gen = torch.Generator().manual_seed(generator_seed)
    eval_idx = shuffled[:settings.holdout] if settings.holdout else shuffled[:bs]
    order = torch.empty(0, dtype=torch.long)  # epochs: every window once before any twice

    autocast = use_bf16_autocast(settings, device)
    compiled = settings.compile == "on"

    def loss_on(idx, tun) -> torch.Tensor:
        # Tunables and rounding in float32; the weights handed to the matmuls in their dtype.
        overrides = quantized_weights(weights, specs, tun, torch.bfloat16 if autocast else torch.float32, compiled)
        return _loss_fn(compiled)(block, overrides, inputs[idx].to(device, torch.float32),
                                          targets[idx].to(device, torch.float32), block_kwargs, settings.loss,
                                          device.type, autocast)

    best = {k: v.clone() for k, v in tunables.items()}  # with no iterations: the starting point
    best_loss, best_iter, rtn_loss = math.inf, 0, math.nan
    trained = offsets + (clips if settings.tune_minmax else [])
    step = {"decay": 1.0}

    def signed_step(p: torch.Tensor) -> None:
        """Called by autograd once p's gradient is complete: step p and free the gradient at once, so the
        gradients of the whole block are never held together."""
        size, low, high = step_rule[id(p)]
        with torch.no_grad():
            p.add_(p.grad.sign_(), alpha=-size * step["decay"])  # the gradient's own memory: it is freed next
            p.clamp_(low, high)
        p.grad = None

    hooks = [p.register_post_accumulate_grad_hook(signed_step) for p in trained]
    # The block's own parameters (norms, biases; its quantized weights are replaced by the tunables' values)
    # need no gradients: without this the backward also ran back into the block's first linear layers' inputs.
    needing_grad = [p for p in block.parameters() if p.requires_grad]
    for p in needing_grad:
        p.requires_grad_(False)
    try:
        for it in range(settings.iters):
            if order.numel() < bs:
                order = torch.cat([order, train_idx[torch.randperm(n, generator=gen)]])
            idx, order = order[:bs], order[bs:]
            loss = loss_on(idx, tunables)
            loss_value = float(loss.detach())
            if it == 0:
                rtn_loss = loss_value
            if not math.isfinite(loss_value):
                break
            if loss_value < best_loss:
                best_loss, best_iter = loss_value, it
                for k, t in tunables.items():  # in place: no second copy of the block's tunables
                    for kept, now in zip(best[k].tensors(), t.tensors()):
                        kept.copy_(now.detach())
            step["decay"] = 1.0 - it / settings.iters  # linear decay to 0
            loss.backward(inputs=trained)  # each parameter steps as soon as its gradient is ready
            del loss
            if progress:
                progress(it, loss_value)
    finally:
        for h in hooks:
            h.remove()
        for p in needing_grad:
            p.requires_grad_(True)
    for name, rows in (keep_rtn_rows or {}).items():
        best[name].reset_rows(rows.to(device))
    with torch.no_grad():
        final_rtn = float(loss_on(eval_idx, None))
        final_tuned = float(loss_on(eval_idx, best)) if settings.departs_from_rtn else final_rtn
    fell_back = not math.isfinite(final_tuned) or final_tuned > final_rtn
    if fell_back:  # diverged or worse than plain rounding on held batch: keep round-to-nearest
        best = {k: LayerTunables.initial(p, specs[k], device) for k, p in params.items()}
        final_tuned = final_rtn
    return BlockResult(tunables=best, rtn_loss=rtn_loss if settings.iters else final_rtn,
                       best_loss=best_loss if settings.iters else final_rtn, final_rtn_loss=final_rtn,
                       final_tuned_loss=final_tuned, best_iter=best_iter, seconds=time.perf_counter() - t0,
                       fell_back_to_rtn=fell_back and settings.departs_from_rtn)


@torch.no_grad()
def block_integers(params: Mapping[str, torch.Tensor], specs: Mapping[str, LayerQuantSpec],
                   tunables: Mapping[str, LayerTunables]) -> dict[str, tuple]:
    """The integers to store for each tuned parameter of a block, by name: (q [R, K], scale, zero), with the
    parameter viewed as R rows of K."""
    return {name: quantize_weight_to_ints(p.detach().float().reshape(-1, p.shape[-1]), specs[name],
                                          *tunables[name].tensors())
            for name, p in params.items()}
