"""Fused dequantize + GEMM for the SignRound packed layout: ``y = x @ W^T``.

The layout is defined once, in :mod:`signround_vllm.format`: ``qweight`` int32
``[K * BITS // 32, N]`` holds the b-bit integers along K, each run of 32 integers
being one little-endian bit stream over ``BITS`` words (so 3-bit integers may
straddle two words); ``scales`` float16 ``[K // G, N]`` (possibly negative);
``qzeros`` uint8 ``[K // G, N]`` for asymmetric layers, the implied zero point
``2^(BITS-1)`` for symmetric ones; ``W[n, k] = (q[k, n] - z) * s``.

One kernel covers every bit width, group size and symmetry (all ``tl.constexpr``).
For each k of a K tile the integer sits in word ``(k // 32) * BITS + ((k % 32) * BITS) // 32``
from bit ``((k % 32) * BITS) % 32`` on, continuing into the next word where
``shift + BITS > 32`` (3 bits only). By default each tile's packed words are loaded
once (``[BLOCK_K * BITS // 32, BLOCK_N]``, or word j of every run for 3 bits) and
repeated along K in registers; ``GemmConfig.gather_words`` instead loads, for every
(k, n), the word holding k (the same word 32 // BITS times, which the software
pipeline then also stages that many times in shared memory). The integers are
dequantized in fp32 (exact: ``q * s - z * s``), cast to the activation dtype and fed
to ``tl.dot`` with an fp32 accumulator; decode tiles of fewer than 16 rows (``BLOCK_M`` 1
to 8, for batches of 1 to 8) multiply with fp32 FMAs and a sum over k instead, so no
padded rows are computed. Loading and dequantizing one tile is the ``@triton.jit`` helper
:func:`load_dequantized_tile`, the multiply :func:`multiply_accumulate`; the
mixture-of-experts kernel (:mod:`signround_triton.fused_moe`) calls the same two. Small
batches split K over a second grid axis and add their partial sums into a zeroed fp32 buffer with atomics (the order
of those fp32 additions is not fixed: results may differ in the last fp32 bit
between runs, rarely in the rounded output).

Tile configurations live in :data:`CONFIGS`, one list per batch-size bucket. On a
GPU the wrapper autotunes over the bucket's list (keyed on N, K, BITS, GROUP_SIZE,
SYM and the dtypes); under ``TRITON_INTERPRET=1`` (where autotuning cannot run) or
when a configuration is forced (the ``config`` argument, or the environment
variable ``SIGNROUND_TRITON_CONFIG``), it launches one configuration directly.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Iterable, Mapping

import torch
import triton
import triton.language as tl

from signround_vllm.format import (
    PACK_RUN,
    QWEIGHT,
    QZEROS,
    SCALES,
    SUPPORTED_BITS,
    LayerQuantSpec,
    validate_layer_tensors,
)

ACT_DTYPES = (torch.float16, torch.bfloat16)
CONFIG_ENV_VAR = "SIGNROUND_TRITON_CONFIG"
GROUP_M = 8  # program-id swizzle: this many M tiles share a column of N tiles (L2 reuse)


# ----------------------------------------------------------------------------
# Tile configurations: the one place they are listed
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """One launch configuration of the kernel."""

    block_m: int  # < 16: decode tiles, multiplied in fp32 FMAs (tensor cores need 16 rows)
    block_n: int
    block_k: int  # a multiple of 32 (whole packing runs); divides G or is a multiple of G
    split_k: int = 1  # > 1: K tiles are dealt round-robin to split_k programs, summed with atomics
    num_warps: int = 4
    num_stages: int = 3
    # False: load the tile's packed words once and expand them in registers (the default);
    # True: load, for every (k, n), the word holding k (the same word 32 // bits times, from L1).
    gather_words: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            least = 1 if name == "block_m" else 16
            if v < least or v & (v - 1):
                raise ValueError(f"GemmConfig.{name}={v} must be a power of two >= {least}"
                                 + (" (tl.dot needs it)" if least == 16 else ""))
        if self.block_k % PACK_RUN:
            raise ValueError(f"GemmConfig.block_k={self.block_k} must be a multiple of {PACK_RUN} "
                             f"(a K tile must hold whole packing runs)")
        if self.split_k < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"GemmConfig {self}: split_k, num_warps and num_stages must be >= 1")

    def meta(self) -> dict[str, int]:
        """The kernel's tl.constexpr tile arguments."""
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k,
                "SPLIT_K": self.split_k, "GATHER_WORDS": self.gather_words}

    @classmethod
    def parse(cls, text: str) -> "GemmConfig":
        """From ``"BLOCK_M=16,BLOCK_N=64,BLOCK_K=128,SPLIT_K=4,num_warps=4,num_stages=4"``
        (optionally ``,GATHER_WORDS=1``)."""
        names = {"BLOCK_M": "block_m", "BLOCK_N": "block_n", "BLOCK_K": "block_k", "SPLIT_K": "split_k",
                 "num_warps": "num_warps", "num_stages": "num_stages", "GATHER_WORDS": "gather_words"}
        values = {}
        for item in text.split(","):
            key, sep, value = item.strip().partition("=")
            if not sep or key not in names or not value.strip().isdigit():
                raise ValueError(f"cannot read GemmConfig from {text!r}: expected comma-separated "
                                 f"KEY=INT with KEY among {list(names)}")
            values[names[key]] = int(value)
        if "gather_words" in values:
            values["gather_words"] = bool(values["gather_words"])
        return cls(**values)

    def __str__(self) -> str:
        text = (f"BLOCK_M={self.block_m},BLOCK_N={self.block_n},BLOCK_K={self.block_k},SPLIT_K={self.split_k},"
                f"num_warps={self.num_warps},num_stages={self.num_stages}")
        return text + (",GATHER_WORDS=1" if self.gather_words else "")


def _c(bm, bn, bk, sk, w, s) -> GemmConfig:
    return GemmConfig(block_m=bm, block_n=bn, block_k=bk, split_k=sk, num_warps=w, num_stages=s)


# Buckets by batch rows M: (name, largest M, candidates). The first candidate of a
# bucket is what runs without autotuning (interpreter, or a single forced choice).
# Small batches are memory bound: split K so that a few N tiles still fill 132 SMs.
# Decode (M <= 8) tiles hold M rows, not 16: they multiply with FMAs instead of tensor
# cores, which do no work for padded rows but need 16 of them (M = 8 also tries 16).
CONFIGS: tuple[tuple[str, int | None, tuple[GemmConfig, ...]], ...] = (
    ("m1", 1, (
        _c(1, 64, 128, 4, 4, 3),
        _c(1, 128, 128, 8, 4, 3),
        _c(1, 32, 256, 4, 4, 3),
        _c(1, 64, 64, 8, 2, 4),
    )),
    ("m2", 2, (
        _c(2, 64, 128, 4, 4, 3),
        _c(2, 64, 64, 8, 4, 4),
        _c(2, 128, 64, 4, 4, 3),
    )),
    ("m4", 4, (
        _c(4, 64, 64, 4, 4, 3),
        _c(4, 32, 128, 4, 4, 3),
        _c(4, 64, 32, 8, 4, 4),
        _c(16, 64, 128, 4, 4, 4),
    )),
    ("m8", 8, (
        _c(8, 32, 64, 4, 4, 3),
        _c(8, 64, 32, 4, 4, 4),
        _c(16, 64, 128, 4, 4, 4),
        _c(16, 64, 128, 2, 4, 4),
    )),
    ("small", 16, (
        _c(16, 64, 128, 4, 4, 4),
        _c(16, 64, 128, 1, 4, 4),
        _c(16, 64, 128, 2, 4, 4),
        _c(16, 128, 128, 2, 4, 4),
        _c(16, 32, 256, 4, 4, 3),
        _c(16, 64, 256, 8, 4, 3),
        _c(16, 128, 64, 4, 4, 4),
        _c(16, 256, 64, 1, 8, 4),
        _c(16, 64, 64, 8, 2, 5),
    )),
    ("medium", 64, (
        _c(32, 64, 128, 1, 4, 4),
        _c(64, 64, 128, 1, 4, 4),
        _c(32, 128, 64, 1, 4, 4),
        _c(64, 128, 64, 1, 4, 4),
        _c(32, 64, 128, 2, 4, 4),
        _c(64, 128, 128, 2, 8, 3),
        _c(64, 256, 64, 1, 8, 3),
    )),
    ("large", None, (
        _c(128, 128, 64, 1, 8, 3),
        _c(128, 128, 64, 1, 4, 4),
        _c(64, 128, 64, 1, 4, 4),
        _c(128, 64, 64, 1, 4, 4),
        _c(128, 256, 64, 1, 8, 3),
        _c(64, 256, 32, 1, 4, 4),
        _c(128, 128, 128, 1, 8, 3),
    )),
)


def bucket_for(m: int) -> tuple[str, tuple[GemmConfig, ...]]:
    """The bucket (name, candidates) for a batch of `m` rows."""
    for name, max_m, configs in CONFIGS:
        if max_m is None or m <= max_m:
            return name, configs
    raise AssertionError("the last bucket must be unbounded")


def all_configs() -> list[GemmConfig]:
    """Every configuration the autotuner may choose, without repeats."""
    return list(dict.fromkeys(c for _, _, configs in CONFIGS for c in configs))


def check_config(config: GemmConfig, group_size: int) -> None:
    """Raise ValueError unless `config` can run layers with `group_size` (-1: per channel).

    The rule: BLOCK_K is a multiple of 32 (checked by GemmConfig) and, unless there is
    one group per channel, BLOCK_K divides the group size (each K tile lies in one group)
    or is a multiple of it (each K tile holds whole groups).
    """
    if group_size == -1:
        return
    if group_size % config.block_k and config.block_k % group_size:
        raise ValueError(f"BLOCK_K={config.block_k} neither divides nor is a multiple of "
                         f"group_size={group_size}; use a power of two >= 32")


def _prune_configs(configs: Iterable, k: int, tile=lambda c: (c.block_k, c.split_k)) -> list:
    """Drop candidates whose K tile exceeds K or that split K into more parts than K tiles.

    `tile(config) -> (BLOCK_K, SPLIT_K)`; keeps the first candidate if none fits.
    """
    configs = list(configs)
    kept = [c for c in configs if tile(c)[0] <= k and tile(c)[1] <= triton.cdiv(k, tile(c)[0])]
    return kept or configs[:1]


def default_config(m: int, k: int) -> GemmConfig:
    """The configuration run without autotuning: the first candidate of the bucket that fits K."""
    return _prune_configs(bucket_for(m)[1], k)[0]


@functools.cache
def forced_config() -> GemmConfig | None:
    """The configuration $SIGNROUND_TRITON_CONFIG forces, read once (call cache_clear() to re-read)."""
    text = os.environ.get(CONFIG_ENV_VAR)
    return GemmConfig.parse(text) if text else None


# ----------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------
@triton.jit
def _repeat_rows(t, ROWS: tl.constexpr, TIMES: tl.constexpr, COLS: tl.constexpr):
    """[ROWS, COLS] -> [ROWS * TIMES, COLS], each row repeated TIMES times in a row."""
    return tl.reshape(tl.broadcast_to(t[:, None, :], [ROWS, TIMES, COLS]), [ROWS * TIMES, COLS])


@triton.jit
def load_dequantized_tile(
    w_tile,  # the tile's first packed word row: qweight_ptr + t * (BLOCK_K * BITS // 32) * stride_wk
    scales_ptr,  # fp16 [K // G, N] of this layer (or expert)
    qzeros_ptr,  # uint8 [K // G, N]; None when SYM
    t,  # index of the K tile: k in [t * BLOCK_K, (t + 1) * BLOCK_K)
    K,
    offs_n,  # [BN] absolute output columns
    mask_n,  # [BN] offs_n < N
    stride_wk, stride_wn,
    stride_sg, stride_sn,
    stride_zg, stride_zn,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, SYM: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    GATHER_WORDS: tl.constexpr, EVEN_K: tl.constexpr,
):
    """W^T [BLOCK_K, BLOCK_N] in fp32 of K tile t: the packed words loaded and dequantized.

    Zero outside K (unless EVEN_K) and outside N. The one copy of the unpacking code, shared by
    the dense kernel and the mixture-of-experts kernel (:mod:`signround_triton.fused_moe`).
    """
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    if EVEN_K:
        k_ok = offs_k < BLOCK_K  # all true, folded away
    else:
        k_ok = t * BLOCK_K + offs_k < K
    n_ok = mask_n[None, :]
    cols_w = offs_n[None, :] * stride_wn  # [1, BN]

    # Where each k of a tile sits in the packed stream. A tile starts on a run boundary
    # (BLOCK_K % 32 == 0), so the pattern is the same for every tile: k lies in word
    # (k // 32) * BITS + word_in_run of the tile, from bit `shift` on.
    RUNS: tl.constexpr = BLOCK_K // 32
    WORDS: tl.constexpr = RUNS * BITS  # packed words per tile and column
    VALUE_MASK: tl.constexpr = (1 << BITS) - 1
    stream_bit = (offs_k % 32) * BITS
    word_in_run = stream_bit // 32  # [BK]
    shift = (stream_bit % 32).to(tl.uint32)  # [BK]
    straddles = shift + BITS > 32  # [BK] the integer continues in the next word of its run
    hi_shift = tl.where(straddles, 32 - shift, 0).to(tl.uint32)  # never a shift by 32

    # ---- the integers q [BK, BN] of this tile ----
    if GATHER_WORDS:
        # One (L1-cached) load per (k, n) of the word holding k, and of the next word
        # where k straddles.
        w_ptrs = w_tile + ((offs_k // 32) * BITS + word_in_run)[:, None] * stride_wk + cols_w
        lo = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok, other=0).to(tl.uint32, bitcast=True)
        if 32 % BITS != 0:
            hi = tl.load(w_ptrs + stride_wk, mask=(k_ok & straddles)[:, None] & n_ok, other=0)
            hi = hi.to(tl.uint32, bitcast=True)
    elif 32 % BITS == 0:
        # Word r of the tile holds k = r * (32 // BITS) + j at shift j * BITS: load the
        # WORDS rows once and repeat each 32 // BITS times.
        offs_w = tl.arange(0, WORDS)
        if EVEN_K:
            w_ok = offs_w < WORDS
        else:
            w_ok = t * BLOCK_K + offs_w * (32 // BITS) < K
        words = tl.load(w_tile + offs_w[:, None] * stride_wk + cols_w, mask=w_ok[:, None] & n_ok, other=0)
        lo = _repeat_rows(words.to(tl.uint32, bitcast=True), WORDS, 32 // BITS, BLOCK_N)
    else:
        # Runs of BITS words: load word j of every run of the tile once, repeat it over
        # the run's 32 integers, and pick per k its word (lo) and the next one (hi).
        offs_run = tl.arange(0, RUNS)
        if EVEN_K:
            run_ok = offs_run < RUNS
        else:
            run_ok = t * RUNS + offs_run < K // 32
        run_ptrs = w_tile + (offs_run * BITS)[:, None] * stride_wk + cols_w  # word 0 of each run
        run_mask = run_ok[:, None] & n_ok
        lo = _repeat_rows(tl.load(run_ptrs, mask=run_mask, other=0).to(tl.uint32, bitcast=True),
                          RUNS, 32, BLOCK_N)
        hi = _repeat_rows(tl.load(run_ptrs + stride_wk, mask=run_mask, other=0).to(tl.uint32, bitcast=True),
                          RUNS, 32, BLOCK_N)
        lo = tl.where(word_in_run[:, None] == 1, hi, lo)
        for j in tl.static_range(2, BITS):
            wj = _repeat_rows(
                tl.load(run_ptrs + j * stride_wk, mask=run_mask, other=0).to(tl.uint32, bitcast=True),
                RUNS, 32, BLOCK_N)
            lo = tl.where(word_in_run[:, None] == j, wj, lo)
            hi = tl.where(word_in_run[:, None] == j - 1, wj, hi)
    q = lo >> shift[:, None]  # logical shift: uint32
    if 32 % BITS != 0:
        q = q | tl.where(straddles[:, None], hi << hi_shift[:, None], 0)
    qf = (q & VALUE_MASK).to(tl.float32)  # [BK, BN], exact

    # ---- dequantize: w = (q - z) * s = q * s - z * s, exact in fp32 ----
    s_cols = offs_n * stride_sn  # [BN]
    z_cols = offs_n * stride_zn  # [BN]
    if GROUP_SIZE == -1 or BLOCK_K <= GROUP_SIZE:
        # The whole tile lies in one group: one row of scales (and zeros).
        if GROUP_SIZE == -1:
            g = 0
        else:
            g = (t * BLOCK_K) // GROUP_SIZE
        s = tl.load(scales_ptr + g * stride_sg + s_cols, mask=mask_n, other=0.0).to(tl.float32)
        if SYM:
            zs = s * (1 << (BITS - 1))
        else:
            z = tl.load(qzeros_ptr + g * stride_zg + z_cols, mask=mask_n, other=0).to(tl.float32)
            zs = z * s
        w = qf * s[None, :] - zs[None, :]
    else:
        # The tile holds BLOCK_K // GROUP_SIZE whole groups: load their rows once and
        # repeat each over its GROUP_SIZE values of k.
        NG: tl.constexpr = BLOCK_K // GROUP_SIZE
        offs_g = (t * BLOCK_K) // GROUP_SIZE + tl.arange(0, NG)
        if EVEN_K:
            g_ok = offs_g >= 0
        else:
            g_ok = offs_g < K // GROUP_SIZE
        g_mask = g_ok[:, None] & n_ok
        s = tl.load(scales_ptr + offs_g[:, None] * stride_sg + s_cols[None, :], mask=g_mask,
                    other=0.0).to(tl.float32)  # [NG, BN]
        if SYM:
            zs = s * (1 << (BITS - 1))
        else:
            z = tl.load(qzeros_ptr + offs_g[:, None] * stride_zg + z_cols[None, :], mask=g_mask,
                        other=0).to(tl.float32)
            zs = z * s
        w = qf * _repeat_rows(s, NG, GROUP_SIZE, BLOCK_N) - _repeat_rows(zs, NG, GROUP_SIZE, BLOCK_N)
    return w


@triton.jit
def multiply_accumulate(acc, a, w, BLOCK_M: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc [BM, BN] fp32 += a [BM, BK] (activation dtype) @ w [BK, BN] (fp32, dequantized)."""
    if BLOCK_M < 16:
        # Decode: no tensor cores for so few rows; products and the sum over k in fp32, the
        # weights rounded to the activation dtype as on the tensor-core path.
        wf = w.to(a.dtype).to(tl.float32)
        acc += tl.sum(a.to(tl.float32)[:, :, None] * wf[None, :, :], axis=1)
    elif DOT_FP32:
        acc += tl.dot(a.to(tl.float32), w, input_precision="ieee")
    else:
        acc += tl.dot(a, w.to(a.dtype))
    return acc


@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit(do_not_specialize=["M"])  # one binary for every batch size (no M == 1 / M % 16 variants)
def dequant_gemm_kernel(
    x_ptr,  # [M, K] fp16/bf16 activations
    qweight_ptr,  # int32 [K * BITS // 32, N]
    scales_ptr,  # fp16 [K // G, N]
    qzeros_ptr,  # uint8 [K // G, N]; None when SYM
    bias_ptr,  # [N]; None unless HAS_BIAS
    c_ptr,  # [M, N] output (x's dtype), or fp32 when SPLIT_K > 1 (atomic partial sums)
    M, N, K,
    stride_xm, stride_xk,
    stride_wk, stride_wn,
    stride_sg, stride_sn,
    stride_zg, stride_zn,
    stride_cm, stride_cn,
    BITS: tl.constexpr,  # 2, 3, 4 or 8
    GROUP_SIZE: tl.constexpr,  # -1: one group per output channel
    SYM: tl.constexpr,  # no zeros tensor: z = 2^(BITS-1)
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,  # upcast both dot operands to fp32 (bf16 under the interpreter)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GATHER_WORDS: tl.constexpr,  # load one word per (k, n) instead of the tile's packed words once
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along K
):
    # Grouped program ids: GROUP_M consecutive M tiles walk the same N tiles.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_rows
    pid_n = (pid % num_pid_in_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_n = tl.max_contiguous(tl.multiple_of(offs_n, BLOCK_N), BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)  # [BK]

    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1] pointers
    # Split pid_k takes K tiles pid_k, pid_k + SPLIT_K, ...; w_tile points at tile t's first word row.
    WORDS: tl.constexpr = BLOCK_K // 32 * BITS  # packed words per tile and column
    w_tile = qweight_ptr + pid_k.to(tl.int64) * (WORDS * stride_wk)
    w_step = SPLIT_K * WORDS * stride_wk

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    num_k_tiles = tl.cdiv(K, BLOCK_K)
    for t in range(pid_k, num_k_tiles, SPLIT_K):
        kk = t * BLOCK_K + offs_k  # [BK] absolute k
        if EVEN_K:
            k_ok = offs_k < BLOCK_K  # all true, folded away
        else:
            k_ok = kk < K
        a = tl.load(x_rows + kk[None, :] * stride_xk, mask=mask_m[:, None] & k_ok[None, :], other=0.0)
        w = load_dequantized_tile(w_tile, scales_ptr, qzeros_ptr, t, K, offs_n, mask_n,
                                  stride_wk, stride_wn, stride_sg, stride_sn, stride_zg, stride_zn,
                                  BITS, GROUP_SIZE, SYM, BLOCK_K, BLOCK_N, GATHER_WORDS, EVEN_K)
        acc = multiply_accumulate(acc, a, w, BLOCK_M, DOT_FP32)
        w_tile += w_step

    if HAS_BIAS:
        if pid_k == 0:  # only the first K split adds the bias
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]

    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
    else:
        tl.atomic_add(c_ptrs, acc, mask=c_mask, sem="relaxed")


def is_interpreted() -> bool:
    """True when the kernel was created under TRITON_INTERPRET=1 (runs on CPU tensors)."""
    return not isinstance(dequant_gemm_kernel.fn, triton.runtime.JITFunction)


# ----------------------------------------------------------------------------
# Autotuning (GPU only)
# ----------------------------------------------------------------------------
def _zero_output(nargs: Mapping) -> None:
    nargs["c_ptr"].zero_()


def _bucket_needs_fp32_buffer(configs: Iterable[GemmConfig]) -> bool:
    return any(c.split_k > 1 for c in configs)


def _triton_configs(configs: Iterable[GemmConfig]) -> list:
    # A split-K candidate accumulates with atomics, so its buffer is zeroed before every
    # launch, benchmark runs included (a Config pre_hook also runs before the final launch).
    return [triton.Config(c.meta(), num_warps=c.num_warps, num_stages=c.num_stages,
                          pre_hook=_zero_output if c.split_k > 1 else None)
            for c in configs]


def _prune_triton_configs(configs, named_args, **kwargs):
    return _prune_configs(configs, named_args["K"], tile=lambda c: (c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"]))


_AUTOTUNERS: dict[str, object] = {}


def _autotuner(bucket: str, configs: tuple[GemmConfig, ...]):
    if bucket not in _AUTOTUNERS:
        _AUTOTUNERS[bucket] = triton.autotune(
            configs=_triton_configs(configs),
            key=["N", "K", "BITS", "GROUP_SIZE", "SYM"],  # the dtypes are added by Triton
            prune_configs_by={"early_config_prune": _prune_triton_configs},
        )(dequant_gemm_kernel)
    return _AUTOTUNERS[bucket]


def tuned_config(m: int) -> str | None:
    """The configuration the autotuner chose at its latest launch for batch size `m`'s bucket."""
    tuner = _AUTOTUNERS.get(bucket_for(m)[0])
    config = getattr(tuner, "best_config", None)
    if config is None:
        return None
    kw = config.kwargs
    return str(GemmConfig(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["SPLIT_K"], config.num_warps,
                          config.num_stages, bool(kw.get("GATHER_WORDS", False))))


# ----------------------------------------------------------------------------
# Host wrapper: checks, allocates, launches
# ----------------------------------------------------------------------------
def kernel_group_size(group_size: int, k: int) -> int:
    """The GROUP_SIZE the kernel takes for a layer with K=k: -1 when one group spans K."""
    return -1 if group_size in (-1, k) else group_size


def check_operands(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, bits: int,
                   group_size: int, k: int, bias: torch.Tensor | None = None,
                   x: torch.Tensor | None = None) -> LayerQuantSpec:
    """Raise a clear error unless a layer's tensors follow the format for K=k (and x, if given, fits).

    Returns the layer's spec, its group size -1 when one group spans K. Layers call it once when
    they are prepared; :func:`dequant_gemm` calls it on every call.
    """
    for name, t in (("x", x), (QWEIGHT, qweight), (SCALES, scales), (QZEROS, qzeros)):
        if not isinstance(t, torch.Tensor) and not (name in ("x", QZEROS) and t is None):
            raise TypeError(f"dequant_gemm: {name} must be a torch.Tensor, found {type(t).__name__}")
    if x is not None:
        if x.dtype not in ACT_DTYPES:
            raise TypeError(f"dequant_gemm: x has dtype {x.dtype}; expected torch.float16 or torch.bfloat16")
        if x.dim() < 1:
            raise ValueError("dequant_gemm: x must have at least one dimension [..., K]")
    if k % PACK_RUN:
        shape = f" (shape {tuple(x.shape)})" if x is not None else ""
        raise ValueError(f"dequant_gemm: x has K={k}{shape}, which is not a multiple of "
                         f"{PACK_RUN}; the packed layout needs K % {PACK_RUN} == 0")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"dequant_gemm: bits={bits!r}; expected one of {list(SUPPORTED_BITS)}")
    group_size = kernel_group_size(group_size, k)
    spec = LayerQuantSpec(bits=bits, group_size=group_size, sym=qzeros is None)
    spec.check_in_features(k, "dequant_gemm")
    if qweight.dim() != 2:
        raise ValueError(f"dequant_gemm: qweight must be 2-D int32 [K * bits // 32, N], "
                         f"found shape {tuple(qweight.shape)}")
    n = qweight.shape[1]
    tensors = {QWEIGHT: qweight, SCALES: scales}
    if qzeros is not None:
        tensors[QZEROS] = qzeros
    validate_layer_tensors("dequant_gemm", tensors, spec, k, n)
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point or tuple(bias.shape) != (n,):
            found = f"{bias.dtype} {tuple(bias.shape)}" if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"dequant_gemm: bias: found {found}, expected a floating tensor of shape ({n},)")
    devices = {t.device for t in (x, qweight, scales, qzeros, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"dequant_gemm: all tensors must be on one device, found {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cpu" and not is_interpreted():
        raise RuntimeError("dequant_gemm: CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 "
                           "before triton is first imported (or use signround_vllm.format.dequantize_packed "
                           "on CPU)")
    return spec


def dequant_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
                 bits: int, group_size: int, bias: torch.Tensor | None = None, *,
                 config: GemmConfig | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ W^T (+ bias), W dequantized on the fly from the packed layout.

    x: fp16 or bf16 [..., K]; qweight int32 [K * bits // 32, N]; scales fp16 [K // G, N];
    qzeros uint8 [K // G, N] or None (symmetric); bias [N] or None. The output has x's dtype.
    `config` forces one launch configuration (otherwise: $SIGNROUND_TRITON_CONFIG, then the
    bucket's first candidate under the interpreter, else autotuning over the bucket).
    Checks every operand first; :func:`launch` is the same without the checks.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"dequant_gemm: x must be a torch.Tensor, found {type(x).__name__}")
    k = x.shape[-1] if x.dim() else 0
    spec = check_operands(qweight, scales, qzeros, bits, group_size, k, bias, x=x)
    return launch(x, qweight, scales, qzeros, bits, spec.group_size, bias, config=config)


def launch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
           bits: int, group_size: int, bias: torch.Tensor | None = None, *,
           config: GemmConfig | None = None) -> torch.Tensor:
    """:func:`dequant_gemm` for operands already checked (group_size -1 when one group spans K)."""
    k = x.shape[-1]
    n = qweight.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)  # [M, K]
    m = x2.shape[0]
    if m == 0 or n == 0:
        return x.new_zeros(*lead, n)

    bucket, candidates = bucket_for(m)
    config = config or forced_config()
    if config is None and is_interpreted():
        config = default_config(m, k)
    if config is not None:
        check_config(config, group_size)
        fp32_buffer = config.split_k > 1
    else:
        fp32_buffer = _bucket_needs_fp32_buffer(candidates)

    if fp32_buffer:
        # Split-K partial sums meet in fp32; zeroed here when forced, by the config hook when tuned.
        c = (torch.zeros if config is not None else torch.empty)(m, n, dtype=torch.float32, device=x.device)
    else:
        c = torch.empty(m, n, dtype=x.dtype, device=x.device)

    args = (x2, qweight, scales, qzeros, bias, c, m, n, k,
            x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1),
            scales.stride(0), scales.stride(1),
            qzeros.stride(0) if qzeros is not None else 0, qzeros.stride(1) if qzeros is not None else 0,
            c.stride(0), c.stride(1))
    flags = dict(BITS=bits, GROUP_SIZE=group_size, SYM=qzeros is None, HAS_BIAS=bias is not None,
                 DOT_FP32=is_interpreted() and x.dtype == torch.bfloat16, GROUP_M=GROUP_M)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    if config is not None:
        dequant_gemm_kernel[grid](*args, **flags, **config.meta(),
                                  num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        _autotuner(bucket, candidates)[grid](*args, **flags)

    y = c.to(x.dtype) if fp32_buffer else c
    return y.reshape(*lead, n)
