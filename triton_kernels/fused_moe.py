"""Fused mixture-of-experts for the SignRound packed layout: a grouped dequantize + GEMM.

A layer has E experts, each with two packed projections laid out as in
:mod:`signround_vllm.format` and stacked on a leading expert dimension: ``w13`` (gate and up
fused along N: ``N = 2 * I``, the first I columns gate, the next I up) and ``w2`` (down:
``K = I``, ``N = hidden``). All experts of one tensor share bits, group size and symmetry; w13
and w2 may differ. Each token goes to ``top_k`` experts; one (token, slot) pair is an
*assignment*, numbered ``token * top_k + slot`` (the flattened ``topk_ids``).

    out[t] = sum_j  w_j * W2_e @ (silu(gate_e(x[t])) * up_e(x[t])),   e = topk_ids[t, j]

How it runs:

1. :func:`sort_tokens_by_expert` (pure torch, no host sync, shapes fixed by M, top_k, E and
   BLOCK_M so CUDA graphs can replay it) lists the assignments expert by expert, each expert's
   run padded to a multiple of BLOCK_M with the sentinel ``M * top_k``, and names the expert of
   every block of BLOCK_M rows (-1 for the unused blocks at the end). Expert ids outside
   ``[0, E)`` (experts of other ranks under expert parallelism) are left out.
2. :func:`fused_moe_kernel`, once per projection for all experts: a program takes one block of
   BLOCK_M sorted rows (all of one expert) and BLOCK_N output columns, gathers its rows of x
   (row ``assignment // top_k`` for the tokens, ``assignment`` for the per-assignment
   intermediate), and accumulates in fp32 over K tiles of that expert's weights, which it
   unpacks and dequantizes with :func:`~signround_triton.dequant_gemm.load_dequantized_tile`,
   the dense kernel's own helper (one copy of the unpacking code, generic over bits, group size
   and symmetry). The down projection multiplies each row by its routing weight before storing.
3. Between and after, torch: ``silu(gate) * up`` on the ``[M * top_k, 2I]`` intermediate (x's
   dtype), and the sum of each token's top_k rows of the fp32 ``[M * top_k, hidden]`` output.

Tiles: :data:`MOE_CONFIGS`, buckets keyed on the average number of assignments per expert; all
candidates of a bucket share BLOCK_M, because the sorted layout (made once for both
projections) depends on it. On a GPU each projection is autotuned over its bucket (keyed on N,
K, BITS, GROUP_SIZE, SYM); under ``TRITON_INTERPRET=1`` (autotuning cannot run there) or when a
configuration is forced, the first candidate that fits K runs directly.
:func:`compile_ahead_of_time` compiles the kernel for a CUDA target without a GPU (what the
interpreter, looser than the compiler, cannot check: shared memory, register spills, types).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from signround_vllm.format import (
    QWEIGHT,
    QZEROS,
    SCALES,
    SUPPORTED_BITS,
    WORD_BITS,
    LayerQuantSpec,
    PackedLinear,
    SignRoundFormatError,
    packed_tensor_specs,
)
from signround_triton.dequant_gemm import (
    ACT_DTYPES,
    GROUP_M,
    GemmConfig,
    _prune_configs,
    check_config,
    kernel_group_size,
    load_dequantized_tile,
    multiply_accumulate,
)


# ----------------------------------------------------------------------------
# The operands
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class PackedExperts:
    """One projection of all E experts of a layer, stacked; the layout of format.py per expert."""

    qweight: torch.Tensor  # int32 [E, K * bits // 32, N]
    scales: torch.Tensor  # float16 [E, K // G, N]
    qzeros: torch.Tensor | None  # uint8 [E, K // G, N]; None when symmetric (zero point 2^(bits-1))
    bits: int
    group_size: int  # -1 (or K): one group per output channel

    @property
    def num_experts(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:  # K
        return self.qweight.shape[1] * WORD_BITS // self.bits

    @property
    def out_features(self) -> int:  # N
        return self.qweight.shape[2]

    @classmethod
    def stack(cls, experts: Sequence[PackedLinear]) -> "PackedExperts":
        """The experts' layers (one spec for all) stacked on a new leading dimension."""
        specs = {p.spec for p in experts}
        if len(specs) != 1:
            raise SignRoundFormatError(f"PackedExperts.stack: the experts must share one spec, found "
                                       f"{sorted(s.short_name() for s in specs)}")
        spec = specs.pop()
        qzeros = None if spec.sym else torch.stack([p.qzeros for p in experts])
        return cls(torch.stack([p.qweight for p in experts]), torch.stack([p.scales for p in experts]), qzeros,
                   spec.bits, spec.group_size)


def check_experts(experts: PackedExperts, name: str, in_features: int,
                  out_features: int | None = None) -> LayerQuantSpec:
    """Raise a clear error naming ``name.tensor`` unless `experts` holds K=in_features and
    N=out_features (None: any N). Returns the spec, its group size -1 when one group spans K."""
    if not isinstance(experts, PackedExperts):
        raise TypeError(f"fused_experts: {name} must be a PackedExperts, found {type(experts).__name__}")
    for tensor in (QWEIGHT, SCALES, QZEROS):
        t = getattr(experts, tensor)
        if not isinstance(t, torch.Tensor) and not (tensor == QZEROS and t is None):
            raise TypeError(f"fused_experts: {name}.{tensor} must be a torch.Tensor, found {type(t).__name__}")
    if isinstance(experts.bits, bool) or experts.bits not in SUPPORTED_BITS:
        raise ValueError(f"fused_experts: {name}.bits={experts.bits!r}; expected one of {list(SUPPORTED_BITS)}")
    if experts.qweight.dim() != 3:
        raise SignRoundFormatError(f"fused_experts: {name}.{QWEIGHT} must be 3-D int32 [E, K * bits // 32, N], "
                                   f"found shape {tuple(experts.qweight.shape)}")
    spec = LayerQuantSpec(experts.bits, kernel_group_size(experts.group_size, in_features), experts.qzeros is None)
    spec.check_in_features(in_features, f"fused_experts: {name}")
    e = experts.num_experts
    n = experts.out_features if out_features is None else out_features
    for tensor, (shape, dtype) in packed_tensor_specs(in_features, n, spec, name).items():
        t = getattr(experts, tensor)
        if tuple(t.shape) != (e, *shape) or t.dtype != dtype:
            raise SignRoundFormatError(
                f"fused_experts: {name}.{tensor}: found {t.dtype} {tuple(t.shape)}, expected {dtype} {(e, *shape)} "
                f"for {e} experts, K={in_features}, N={n}, {spec.short_name()}")
    return spec


def check_fused_experts(x: torch.Tensor, w13: PackedExperts, w2: PackedExperts, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor) -> tuple[LayerQuantSpec, LayerQuantSpec]:
    """Raise an error naming the operand unless the operands of :func:`fused_experts` fit together.

    Returns the specs of w13 and w2 (group size -1 when one group spans K).
    """
    for name, t in (("x", x), ("topk_weights", topk_weights), ("topk_ids", topk_ids)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fused_experts: {name} must be a torch.Tensor, found {type(t).__name__}")
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"fused_experts: x has dtype {x.dtype}; expected torch.float16 or torch.bfloat16")
    if x.dim() != 2:
        raise ValueError(f"fused_experts: x must be 2-D [M, hidden], found shape {tuple(x.shape)}")
    m, hidden = x.shape
    spec13 = check_experts(w13, "w13", hidden)
    if w13.out_features % 2:
        raise ValueError(f"fused_experts: w13 has N={w13.out_features} columns; expected 2 * I (gate, then up)")
    spec2 = check_experts(w2, "w2", w13.out_features // 2, hidden)
    if w2.num_experts != w13.num_experts:
        raise ValueError(f"fused_experts: w13 has {w13.num_experts} experts but w2 has {w2.num_experts}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != m or topk_ids.dtype.is_floating_point \
            or topk_ids.dtype == torch.bool or topk_ids.is_complex():
        raise ValueError(f"fused_experts: topk_ids: found {topk_ids.dtype} {tuple(topk_ids.shape)}, expected an "
                         f"integer tensor [M={m}, top_k]")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape) or not topk_weights.dtype.is_floating_point:
        raise ValueError(f"fused_experts: topk_weights: found {topk_weights.dtype} {tuple(topk_weights.shape)}, "
                         f"expected a floating tensor of topk_ids' shape {tuple(topk_ids.shape)}")
    tensors = (x, topk_weights, topk_ids, w13.qweight, w13.scales, w13.qzeros, w2.qweight, w2.scales, w2.qzeros)
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"fused_experts: all tensors must be on one device, found {sorted(map(str, devices))}")
    if devices.pop().type == "cpu" and not is_interpreted():
        raise RuntimeError("fused_experts: CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 "
                           "before triton is first imported")
    return spec13, spec2


# ----------------------------------------------------------------------------
# Sorting the assignments by expert (pure torch)
# ----------------------------------------------------------------------------
class SortedAssignments(NamedTuple):
    """The assignments grouped by expert, in blocks of block_m rows of one expert each."""

    sorted_ids: torch.Tensor  # int32 [num_blocks * block_m]: assignment ids; the sentinel M * top_k pads
    block_expert: torch.Tensor  # int32 [num_blocks]: each block's expert, -1 for unused blocks
    num_padded: torch.Tensor  # int32 [1]: rows in use (the padded runs), on the device (no host sync)


def sort_tokens_by_expert(topk_ids: torch.Tensor, n_experts: int, block_m: int) -> SortedAssignments:
    """Group the assignments of `topk_ids` [M, top_k] by expert for blocks of `block_m` rows.

    ``sorted_ids`` lists expert 0's assignments (flattened indices ``token * top_k + slot``, in
    token order), padded with the sentinel ``M * top_k`` to a multiple of block_m, then expert
    1's, ...; ids outside [0, n_experts) are left out. Its length is the most any routing of
    these sizes can need, ``num_blocks * block_m`` with ``num_blocks = ceil((A + min(E, A) *
    (block_m - 1)) / block_m)`` for A = M * top_k assignments, so the shapes depend on the sizes
    only; blocks after the last run hold only sentinels and have expert -1.
    """
    if n_experts < 1 or block_m < 1:
        raise ValueError(f"sort_tokens_by_expert: n_experts={n_experts} and block_m={block_m} must be >= 1")
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)  # [A]
    n_assign = flat.numel()
    num_blocks = triton.cdiv(n_assign + min(n_experts, n_assign) * (block_m - 1), block_m)
    capacity = num_blocks * block_m

    kept = (flat >= 0) & (flat < n_experts)
    expert_key = torch.where(kept, flat, n_experts)  # [A]; left-out ids sort last, under key E
    counts = torch.zeros(n_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, expert_key, torch.ones_like(expert_key))
    counts = counts[:n_experts]  # [E] assignments per expert
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    run_end = torch.cumsum(padded, 0)  # [E] end of each expert's run in sorted_ids
    run_start = run_end - padded
    first_in_order = torch.cumsum(counts, 0) - counts  # [E] where each expert starts in `order`

    order = torch.argsort(expert_key, stable=True)  # [A] assignments by expert, token order kept
    order_expert = expert_key[order]
    kept_sorted = order_expert < n_experts
    expert_or_0 = torch.where(kept_sorted, order_expert, 0)
    rank = torch.arange(n_assign, device=device) - first_in_order[expert_or_0]  # place within its expert
    dest = torch.where(kept_sorted, run_start[expert_or_0] + rank, capacity)  # left out -> a spare slot

    sorted_ids = torch.full((capacity + 1,), n_assign, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(num_blocks, device=device, dtype=torch.int64) * block_m
    block_expert = torch.searchsorted(run_end, block_start, right=True)  # first run ending after the block
    block_expert = torch.where(block_expert < n_experts, block_expert, -1).to(torch.int32)
    return SortedAssignments(sorted_ids[:capacity], block_expert, run_end[-1:].to(torch.int32))


# ----------------------------------------------------------------------------
# Tile configurations: the one place they are listed
# ----------------------------------------------------------------------------
def _c(bm, bn, bk, w, s) -> GemmConfig:
    return GemmConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=s)


# Buckets by the average assignments per expert (M * top_k / E): (name, largest average,
# candidates). All candidates of a bucket share BLOCK_M (the sorted layout depends on it);
# the first is what runs without autotuning. Few rows per expert is decode: a row block is
# mostly padding and the weights' bytes dominate, so small BLOCK_M and wide K tiles.
MOE_CONFIGS: tuple[tuple[str, int | None, tuple[GemmConfig, ...]], ...] = (
    ("small", 16, (
        _c(16, 64, 128, 4, 3),
        _c(16, 128, 64, 4, 4),
        _c(16, 32, 256, 4, 3),
        _c(16, 64, 64, 2, 4),
    )),
    ("medium", 96, (
        _c(32, 64, 128, 4, 4),
        _c(32, 128, 64, 4, 4),
        _c(32, 64, 64, 4, 4),
    )),
    ("large", None, (
        _c(64, 128, 64, 4, 4),
        _c(64, 64, 128, 4, 4),
        _c(64, 128, 128, 8, 3),
        _c(64, 256, 64, 8, 3),
    )),
)


def moe_bucket_for(n_assignments: int, n_experts: int) -> tuple[str, tuple[GemmConfig, ...]]:
    """The bucket (name, candidates) for `n_assignments` rows over `n_experts` experts."""
    per_expert = n_assignments / max(n_experts, 1)
    for name, max_rows, configs in MOE_CONFIGS:
        if max_rows is None or per_expert <= max_rows:
            return name, configs
    raise AssertionError("the last bucket must be unbounded")


def all_moe_configs() -> list[GemmConfig]:
    """Every configuration the autotuner may choose, without repeats."""
    return list(dict.fromkeys(c for _, _, configs in MOE_CONFIGS for c in configs))


# ----------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def fused_moe_kernel(
    x_ptr,  # [M, K] tokens, or [M * top_k, K] assignments (ASSIGNMENTS_PER_X_ROW == 1); fp16/bf16
    qweight_ptr,  # int32 [E, K * BITS // 32, N]
    scales_ptr,  # fp16 [E, K // G, N]
    qzeros_ptr,  # uint8 [E, K // G, N]; None when SYM
    routing_weights_ptr,  # [M * top_k] contiguous, one per assignment; None unless MUL_ROUTING_WEIGHT
    out_ptr,  # [M * top_k, N] one row per assignment; rows of left-out assignments are not written
    sorted_ids_ptr,  # int32 [num_blocks * BLOCK_M] assignments by expert; num_assignments pads
    block_expert_ptr,  # int32 [num_blocks] the expert of each block of BLOCK_M sorted rows, -1: none
    num_assignments, num_blocks, N, K,
    stride_xm, stride_xk,
    stride_we, stride_wk, stride_wn,
    stride_se, stride_sg, stride_sn,
    stride_ze, stride_zg, stride_zn,
    stride_om, stride_on,
    ASSIGNMENTS_PER_X_ROW: tl.constexpr,  # top_k when x holds tokens, 1 when it holds assignments
    MUL_ROUTING_WEIGHT: tl.constexpr,
    BITS: tl.constexpr,  # 2, 3, 4 or 8
    GROUP_SIZE: tl.constexpr,  # -1: one group per output channel
    SYM: tl.constexpr,  # no zeros tensor: z = 2^(BITS-1)
    DOT_FP32: tl.constexpr,  # upcast both dot operands to fp32 (bf16 under the interpreter)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GATHER_WORDS: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along K
):
    # Grouped program ids as in the dense kernel: GROUP_M row blocks walk the same N tiles.
    pid = tl.program_id(0)
    num_pid_m = num_blocks
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_rows
    pid_n = (pid % num_pid_in_group) // group_rows

    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:  # a block after the last expert's run
        return

    offs_rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] positions in sorted_ids
    assignment = tl.load(sorted_ids_ptr + offs_rows).to(tl.int64)  # [BM]
    row_ok = assignment < num_assignments  # [BM] the sentinel pads
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_n = tl.max_contiguous(tl.multiple_of(offs_n, BLOCK_N), BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)  # [BK]

    x_rows = x_ptr + (assignment // ASSIGNMENTS_PER_X_ROW)[:, None] * stride_xm  # [BM, 1] pointers
    scales_e = scales_ptr + expert * stride_se
    if SYM:
        zeros_e = qzeros_ptr
    else:
        zeros_e = qzeros_ptr + expert * stride_ze
    WORDS: tl.constexpr = BLOCK_K // 32 * BITS  # packed words per tile and column
    w_tile = qweight_ptr + expert * stride_we  # tile t's first word row, advanced per tile

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(0, tl.cdiv(K, BLOCK_K)):
        kk = t * BLOCK_K + offs_k  # [BK] absolute k
        if EVEN_K:
            k_ok = offs_k < BLOCK_K  # all true, folded away
        else:
            k_ok = kk < K
        a = tl.load(x_rows + kk[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = load_dequantized_tile(w_tile, scales_e, zeros_e, t, K, offs_n, mask_n,
                                  stride_wk, stride_wn, stride_sg, stride_sn, stride_zg, stride_zn,
                                  BITS, GROUP_SIZE, SYM, BLOCK_K, BLOCK_N, GATHER_WORDS, EVEN_K)
        acc = multiply_accumulate(acc, a, w, BLOCK_M, DOT_FP32)
        w_tile += WORDS * stride_wk

    if MUL_ROUTING_WEIGHT:
        acc *= tl.load(routing_weights_ptr + assignment, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + assignment[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & mask_n[None, :])


def is_interpreted() -> bool:
    """True when the kernel was created under TRITON_INTERPRET=1 (runs on CPU tensors)."""
    return not isinstance(fused_moe_kernel.fn, triton.runtime.JITFunction)


# ----------------------------------------------------------------------------
# Autotuning (GPU only)
# ----------------------------------------------------------------------------
_AUTOTUNERS: dict[str, object] = {}


def _autotuner(bucket: str, configs: tuple[GemmConfig, ...]):
    if bucket not in _AUTOTUNERS:
        _AUTOTUNERS[bucket] = triton.autotune(
            configs=[triton.Config({k: v for k, v in c.meta().items() if k != "SPLIT_K"},  # K is never split here
                                   num_warps=c.num_warps, num_stages=c.num_stages) for c in configs],
            key=["N", "K", "BITS", "GROUP_SIZE", "SYM"],  # the dtypes are added by Triton
            prune_configs_by={"early_config_prune": lambda configs, named_args, **kw: _prune_configs(
                configs, named_args["K"], tile=lambda c: (c.kwargs["BLOCK_K"], 1))},
        )(fused_moe_kernel)
    return _AUTOTUNERS[bucket]


# ----------------------------------------------------------------------------
# Host side: checks, sorting, launches
# ----------------------------------------------------------------------------
def _candidates(n_assignments: int, n_experts: int, config: GemmConfig | None) -> tuple[GemmConfig, ...]:
    """The forced config alone, or the bucket's list."""
    if config is None:
        return moe_bucket_for(n_assignments, n_experts)[1]
    if config.split_k != 1:
        raise ValueError(f"fused_experts: config {config} has split_k={config.split_k}; the MoE kernel "
                         f"does not split K (use split_k=1)")
    return (config,)


def grouped_gemm(x: torch.Tensor, experts: PackedExperts, routing: SortedAssignments, *, num_assignments: int,
                 assignments_per_x_row: int, candidates: tuple[GemmConfig, ...],
                 routing_weights: torch.Tensor | None = None, out: torch.Tensor) -> torch.Tensor:
    """One launch for all experts: out[a] = (x[a // assignments_per_x_row] @ W_e^T) (* routing_weights[a]).

    Rows of `out` [num_assignments, N] (any float dtype) are written only for the assignments in
    `routing`, made by :func:`sort_tokens_by_expert` with the candidates' BLOCK_M. Operands are
    not checked here; one candidate launches directly (interpreter: the first that fits K), more
    are autotuned.
    """
    k, n = x.shape[1], experts.out_features
    block_m = candidates[0].block_m
    num_blocks = routing.block_expert.numel()
    if num_blocks * block_m != routing.sorted_ids.numel() or any(c.block_m != block_m for c in candidates):
        raise ValueError(f"grouped_gemm: the sorted layout has {routing.sorted_ids.numel()} rows in {num_blocks} "
                         f"blocks; it must have been sorted for BLOCK_M={block_m} of every candidate")
    if num_blocks == 0 or n == 0:
        return out
    group_size = kernel_group_size(experts.group_size, k)
    qz = experts.qzeros
    qz_strides = qz.stride() if qz is not None else (0, 0, 0)
    args = (x, experts.qweight, experts.scales, qz, routing_weights, out, routing.sorted_ids, routing.block_expert,
            num_assignments, num_blocks, n, k, x.stride(0), x.stride(1),
            *experts.qweight.stride(), *experts.scales.stride(), *qz_strides, out.stride(0), out.stride(1))
    flags = dict(ASSIGNMENTS_PER_X_ROW=assignments_per_x_row, MUL_ROUTING_WEIGHT=routing_weights is not None,
                 BITS=experts.bits, GROUP_SIZE=group_size, SYM=qz is None,
                 DOT_FP32=is_interpreted() and x.dtype == torch.bfloat16, GROUP_M=GROUP_M)

    def grid(meta):
        return (num_blocks * triton.cdiv(n, meta["BLOCK_N"]),)

    if len(candidates) == 1 or is_interpreted():
        config = _prune_configs(candidates, k)[0]
        check_config(config, group_size)
        fused_moe_kernel[grid](*args, **flags, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                               BLOCK_K=config.block_k, GATHER_WORDS=config.gather_words,
                               num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        bucket = next(name for name, _, configs in MOE_CONFIGS if configs == candidates)
        _autotuner(bucket, candidates)[grid](*args, **flags)
    return out


def launch_fused_experts(x: torch.Tensor, w13: PackedExperts, w2: PackedExperts, topk_weights: torch.Tensor,
                         topk_ids: torch.Tensor, *, config: GemmConfig | None = None) -> torch.Tensor:
    """:func:`fused_experts` for operands already checked."""
    m, hidden = x.shape
    top_k = topk_ids.shape[1]
    n_assign = m * top_k
    inter = w13.out_features // 2
    if n_assign == 0:
        return x.new_zeros(m, hidden)
    candidates = _candidates(n_assign, w13.num_experts, config)
    routing = sort_tokens_by_expert(topk_ids, w13.num_experts, candidates[0].block_m)

    gate_up = torch.empty(n_assign, 2 * inter, dtype=x.dtype, device=x.device)  # [A, 2I]
    grouped_gemm(x, w13, routing, num_assignments=n_assign, assignments_per_x_row=top_k, candidates=candidates,
                 out=gate_up)
    # Rows of left-out assignments hold garbage here; the down projection never reads them.
    act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [A, I]
    # fp32 rows, zero for left-out assignments, so that the sum over top_k rounds once.
    down = torch.zeros(n_assign, hidden, dtype=torch.float32, device=x.device)  # [A, hidden]
    grouped_gemm(act, w2, routing, num_assignments=n_assign, assignments_per_x_row=1, candidates=candidates,
                 routing_weights=topk_weights.reshape(-1).contiguous(), out=down)
    return down.view(m, top_k, hidden).sum(dim=1).to(x.dtype)


def fused_experts(x: torch.Tensor, w13: PackedExperts, w2: PackedExperts, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, *, config: GemmConfig | None = None) -> torch.Tensor:
    """The mixture-of-experts MLP: out [M, hidden] in x's dtype.

    x: fp16 or bf16 [M, hidden]; w13: gate and up of every expert, N = 2 * I (gate first); w2:
    down, K = I, N = hidden; topk_weights [M, top_k] (any float dtype) and topk_ids [M, top_k]
    (integers; ids outside [0, E) are skipped and add nothing). `config` forces one tile
    configuration (split_k 1) for both projections; otherwise the bucket's first candidate runs
    under the interpreter, and its candidates are autotuned on a GPU. Checks every operand
    first; :func:`launch_fused_experts` is the same without the checks.
    """
    check_fused_experts(x, w13, w2, topk_weights, topk_ids)
    return launch_fused_experts(x, w13, w2, topk_weights, topk_ids, config=config)


# ----------------------------------------------------------------------------
# Ahead-of-time compilation (no GPU needed): what the interpreter cannot check
# ----------------------------------------------------------------------------
def compile_ahead_of_time(config: GemmConfig, bits: int, group_size: int, sym: bool, act_dtype: str,
                          projection: str = "down", top_k: int = 8, even_k: bool = True, capability: int = 90):
    """Triton's CompiledKernel for a CUDA target of one projection's launch (no GPU needed).

    projection "up": x holds tokens (row = assignment // top_k), output in act_dtype ("fp16" or
    "bf16"); "down": x holds assignments, routing weights applied, fp32 output. The signature is
    that of contiguous tensors: unit strides specialized to 1, pointers, N, K and the other
    strides 16-aligned. Needs TRITON_INTERPRET unset when this module is imported.
    """
    from signround_triton.aot_check import compile_for_cuda

    if projection not in ("up", "down"):
        raise ValueError(f"projection={projection!r}; expected 'up' or 'down'")
    check_config(config, group_size)
    fn = fused_moe_kernel.fn
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset when "
                           "signround_triton.fused_moe is imported")
    down = projection == "down"
    pointers = {"x_ptr": f"*{act_dtype}", "qweight_ptr": "*i32", "scales_ptr": "*fp16",
                "out_ptr": "*fp32" if down else f"*{act_dtype}", "sorted_ids_ptr": "*i32", "block_expert_ptr": "*i32"}
    if down:
        pointers["routing_weights_ptr"] = "*fp32"
    if not sym:
        pointers["qzeros_ptr"] = "*u8"
    constexprs = dict(ASSIGNMENTS_PER_X_ROW=1 if down else top_k, MUL_ROUTING_WEIGHT=down, BITS=bits,
                      GROUP_SIZE=group_size, SYM=sym, DOT_FP32=False, BLOCK_M=config.block_m,
                      BLOCK_N=config.block_n, BLOCK_K=config.block_k, GATHER_WORDS=config.gather_words,
                      GROUP_M=GROUP_M, EVEN_K=even_k, stride_xk=1, stride_wn=1, stride_sn=1, stride_zn=1,
                      stride_on=1)
    if not down:
        constexprs["routing_weights_ptr"] = None
    if sym:
        constexprs.update(qzeros_ptr=None, stride_ze=0, stride_zg=0, stride_zn=0)
    return compile_for_cuda(fn, pointers, constexprs,
                            lambda name: name.startswith("stride") or name in ("N", "K"),  # the rest: sizes
                            config.num_warps, config.num_stages, capability)
