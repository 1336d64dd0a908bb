"""CPU linear layers on PyTorch's int4-pack kernel: fast decode, one copy of the weights.

The weights are held once, in the layout of `torch.ops.aten._weight_int4pack_mm_for_cpu`
(`_convert_weight_to_int4pack_for_cpu`: uint8 [N, K/2]), with one `[G, N, 2]` table of
(scale, offset) per group. That kernel computes w = (q - 8) * scale + offset, so our
w = (q - zero) * scale is held as offset = (8 - zero) * scale. Per call, by the batch rows M:

  M <= threshold          the int4-pack kernel (reads 4 bits per weight: 3-5x faster than a
                           bf16 GEMM at M = 1 on a 2-core Zen 4, 2.8x on a Xeon with AMX; slower
                           than bf16 from M = 8 to 16 on)
  M >  threshold          the same packed weights dequantized tile by tile (a few MiB at a time)
                           into a bf16/fp16 GEMM, which is compute-bound there (on AMX, where bf16
                           GEMMs are fast, 0.3-0.55x of bf16: the dequantization dominates)

The threshold (`INT4PACK_MAX_ROWS`, by kind of CPU and torch threads) comes from the table
`benchmarks/cpu_kernel_table.py` prints (benchmarks/results/cpu-kernel-table*.md) and lives only here.

Numerics. The kernel takes the table in the activation dtype, so with bf16 activations the fp16
scale is rounded to bf16 (relative error up to 2^-8), and so is the offset. 2- and 3-bit layers and
symmetric 4-bit ones are stored as q - zero + 8 (it fits in 4 bits), so their offset is exactly 0
and each weight is within 2^-8 of its size of the exact (q - zero) * scale, as bf16's own rounding
of the weight is. Asymmetric 4-bit layers keep offset = (8 - zero) * scale, corrected for the
scale's rounding at the middle of the integer range: each weight is then within
(|q - 7.5| + |offset| / scale) * 2^-8 <= 1/16 of a quantization step. The tile path reads the same
table and computes each weight in float32, rounding it once to the activation dtype.
`exact=True` keeps the table in float32 and always takes the tile path: every weight then equals
the format's dequantized weight rounded once to the activation dtype (slower at decode; the
`cpu_int4_exact` candidate).

2- and 3-bit layers use the same kernel with their integers in 4-bit containers (exact).
Layers whose group size is -1 (per channel) are held with groups of the largest of 256, 128,
64, 32 that divides K and the scale repeated (exact).
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from signround_vllm.format import LayerQuantSpec, PackedLinear, unpack_int_weights

KERNEL_GROUP_SIZES = (256, 128, 64, 32)  # what the int4-pack kernel takes, largest first
ACT_DTYPES = (torch.bfloat16, torch.float16)
BLOCK_N = 64  # the layout stores output columns in blocks of 64 (a tail of N % 64 columns apart)
TILE_BYTES = 4 << 20  # dequantized tile size for the GEMM path

# Largest batch rows M for which the int4-pack kernel beats dequantized tiles + GEMM, by kind of CPU and
# torch threads of the process (the kernel is compute-bound where bf16 GEMMs are bandwidth-bound, so the
# crossover moves with threads and with the GEMM's speed). Measured by
# `python benchmarks/cpu_kernel_table.py --threads T` with torch 2.13 CPU, bf16, group 128, at
# Llama-3.2-1B's layer shapes (benchmarks/results/cpu-kernel-table*.md): "avx512" on a 2-core AMD EPYC
# (Zen 4), "amx" on a 2-core Xeon with AMX (bf16 GEMMs on AMX tiles are much faster there, so the tiles
# win from fewer rows on). vLLM's CPU worker runs on 1 thread on such machines (it reserves one of the
# two cores). Re-measure on a different machine and change it here only.
INT4PACK_MAX_ROWS = {"avx512": {1: 32, 2: 96}, "amx": {1: 16}}


def cpu_kind() -> str:
    """The row of INT4PACK_MAX_ROWS for this CPU."""
    return "amx" if torch.cpu._is_amx_tile_supported() else "avx512"


def int4pack_kernel_usable() -> tuple[bool, str | None]:
    """Whether the int4-pack kernel may run inside vLLM here. On CPUs with AMX the process must first be
    allowed the AMX tile state (Linux grants it per process on request): vLLM's AMX attention uses tiles
    without asking, relying on oneDNN, which asks on its first AMX GEMM. When the int4-pack kernel serves
    every small batch, no oneDNN GEMM may run before the first attention call, and the worker died with
    SIGILL (seen with torch 2.13 and vLLM 0.32 on a Xeon with AMX, a tiny Llama). So the permission is
    requested here, once; if Linux refuses it, the layers use the tile path only."""
    if torch.cpu._is_amx_tile_supported() and not request_amx_tile_permission():
        return False, "this CPU has AMX but the process was not allowed the AMX tile state (arch_prctl refused)"
    return True, None


def request_amx_tile_permission() -> bool:
    """On a CPU with AMX, make sure this process holds the AMX tile data state; True if it does (False
    without AMX)."""
    return torch.cpu._is_amx_tile_supported() and _ask_linux_for_amx_tiles()


@functools.cache
def _ask_linux_for_amx_tiles() -> bool:
    """ARCH_REQ_XCOMP_PERM for the tile data state, once per process; True if granted."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) == 0
    except (OSError, AttributeError):
        return False


def max_rows_for(threads: int, kind: str | None = None) -> int:
    """The threshold for this kind of CPU (default: this one) measured at the largest thread count <= threads
    (the smallest measured one below that)."""
    table = INT4PACK_MAX_ROWS[kind or cpu_kind()]
    measured = sorted(table)
    return table[max([t for t in measured if t <= threads] or measured[:1])]


def kernel_group_size(spec: LayerQuantSpec, in_features: int) -> int | None:
    """The int4-pack group size that holds this layer exactly, or None if there is none."""
    if spec.group_size != -1:
        return spec.group_size if spec.group_size in KERNEL_GROUP_SIZES else None
    return next((g for g in KERNEL_GROUP_SIZES if in_features % g == 0), None)


def can_hold(spec: LayerQuantSpec, in_features: int, out_features: int) -> tuple[bool, str | None]:
    if spec.bits > 4:
        return False, f"the int4-pack kernel holds at most 4 bits per weight (layer has {spec.bits})"
    if out_features % 16:
        return False, f"the int4-pack kernel needs out_features divisible by 16 (got {out_features})"
    if kernel_group_size(spec, in_features) is None:
        return False, (f"the int4-pack kernel takes groups of {sorted(KERNEL_GROUP_SIZES)} "
                       f"(layer: {spec.group_size} over in_features={in_features})")
    if not layout_understood():
        return False, f"this torch ({torch.__version__}) packs int4 weights in a layout the tile path cannot read"
    return True, None


@dataclasses.dataclass
class Int4PackWeights:
    packed: torch.Tensor  # uint8 [N, K / 2], the int4-pack kernel's layout
    scale_offset: torch.Tensor  # [K / g, N, 2]: (scale, (8 - zero) * scale), act dtype (float32 if exact)
    group_size: int


def to_int4pack(packed: PackedLinear, act_dtype: torch.dtype, exact: bool = False) -> Int4PackWeights:
    """The layer's integers (any width up to 4) in the int4-pack layout, with its scale/offset table."""
    spec, k = packed.spec, packed.in_features
    g = kernel_group_size(spec, k)
    stored_group = spec.effective_group_size(k)
    q = unpack_int_weights(packed.qweight, spec.bits).to(torch.int32)  # [K, N]
    zero = packed.zero_points().to(torch.int32)  # [K / stored_group, N]
    if spec.bits < 4 or spec.sym:
        # q - zero + 8 fits in [0, 15] (|q - zero| <= 7): stored that way, the offset is exactly 0
        q = q - zero.repeat_interleave(stored_group, dim=0) + 8
        zero = torch.full_like(zero, 8)
        middle = 8.0
    else:
        middle = 7.5
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.t().contiguous(), 1)
    scale = packed.scales.to(torch.float32).repeat_interleave(stored_group // g, dim=0)  # [K / g, N]
    offset = (8 - zero).to(torch.float32).repeat_interleave(stored_group // g, dim=0) * scale  # exact
    if not exact:
        # The scale is rounded to the activation dtype; the offset absorbs that rounding at the middle
        # of the integer range, so a weight is off by (q - middle) * (rounded - exact scale).
        rounded = scale.to(act_dtype).to(torch.float32)
        offset = offset + (middle - 8) * (scale - rounded)
        scale = rounded
    table = torch.stack([scale, offset], dim=-1)
    return Int4PackWeights(weight, table.to(torch.float32 if exact else act_dtype).contiguous(), g)


def _unpack_tail(w: Int4PackWeights, k: int) -> torch.Tensor:
    """uint8 integers [K, N % 64] of the tail columns: [K, tail / 2] bytes, low nibble = even column."""
    n = w.packed.shape[0]
    n_blocked = n - n % BLOCK_N
    tail = w.packed.view(-1)[n_blocked * k // 2:].view(k, (n - n_blocked) // 2)
    return torch.stack([tail & 15, tail >> 4], dim=-1).view(k, n - n_blocked)


def _blocks(w: Int4PackWeights, k: int) -> torch.Tensor:
    """The 64-column blocks as uint8 [N / 64, K, 32]: byte j = column j (low nibble) and j + 32 (high)."""
    n_blocked = w.packed.shape[0] // BLOCK_N * BLOCK_N
    return w.packed.view(-1)[: n_blocked * k // 2].view(n_blocked // BLOCK_N, k, BLOCK_N // 2)


def _dequantize_blocks(blocks: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
    """W^T [K, nb * 64] in `dtype` from blocks uint8 [nb, K, 32] and their scales and offsets
    [G, nb * 64] (contiguous); each weight computed in float32 and rounded once. The low and high
    nibbles are dequantized separately and only then interleaved: inductor then compiles one loop
    with no integer temporary (3-4x faster than splitting the nibbles first)."""
    nb, k, _ = blocks.shape
    groups = scale.shape[0]
    scale = scale.to(torch.float32).view(groups, 1, nb, 2, BLOCK_N // 2)
    offset = offset.to(torch.float32).view(groups, 1, nb, 2, BLOCK_N // 2)
    b = blocks.permute(1, 0, 2).reshape(groups, k // groups, nb, BLOCK_N // 2)
    low = ((b & 15).to(torch.float32) - 8) * scale[..., 0, :] + offset[..., 0, :]
    high = ((b >> 4).to(torch.float32) - 8) * scale[..., 1, :] + offset[..., 1, :]
    return torch.stack([low.to(dtype), high.to(dtype)], dim=3).reshape(k, nb * BLOCK_N)


@functools.cache
def _compiled_dequantize():
    """`_dequantize_blocks` compiled by inductor into one fused loop (5-10x eager on the CPU), or the
    eager function where compiling is not possible here (no C++ compiler), with a warning."""
    try:
        fn = torch.compile(_dequantize_blocks, dynamic=True)
        fn(torch.zeros(2, 64, 32, dtype=torch.uint8), torch.ones(2, 128), torch.ones(2, 128), torch.bfloat16)
        return fn
    except Exception as e:  # noqa: BLE001  any compiler failure: the eager function computes the same
        import logging

        logging.getLogger("vllm.signround").warning(
            "SignRound int4-pack tiles: torch.compile failed (%s: %s); dequantizing in eager mode (slower "
            "for batches above the int4-pack kernel's rows)", type(e).__name__, str(e).splitlines()[0][:200])
        return _dequantize_blocks


def dequantize_columns(w: Int4PackWeights, k: int, col0: int, col1: int, dtype: torch.dtype,
                       compiled: bool = True) -> torch.Tensor:
    """W^T [K, col1 - col0] of output columns [col0, col1) in `dtype` (block-aligned, or the tail)."""
    n_blocked = w.packed.shape[0] // BLOCK_N * BLOCK_N
    table = w.scale_offset[:, col0:col1]
    if col0 >= n_blocked:
        t = table.to(torch.float32)[:, None]
        q = _unpack_tail(w, k)[:, col0 - n_blocked: col1 - n_blocked].to(torch.float32)
        return ((q.view(t.shape[0], -1, col1 - col0) - 8) * t[..., 0] + t[..., 1]).view(k, -1).to(dtype)
    dequantize = _compiled_dequantize() if compiled else _dequantize_blocks
    scale, offset = (t.contiguous() for t in table.unbind(-1))
    return dequantize(_blocks(w, k)[col0 // BLOCK_N: col1 // BLOCK_N], scale, offset, dtype)


def _tiles(k: int, n: int, itemsize: int) -> list[tuple[int, int]]:
    n_blocked = n - n % BLOCK_N
    step = max(BLOCK_N, TILE_BYTES // (itemsize * k) // BLOCK_N * BLOCK_N)
    out = [(c, min(c + step, n_blocked)) for c in range(0, n_blocked, step)]
    return out + ([(n_blocked, n)] if n_blocked < n else [])


def tiled_linear(x2: torch.Tensor, w: Int4PackWeights) -> torch.Tensor:
    """x2 [M, K] @ W^T through dequantized tiles of W (the large-M path)."""
    k, n = x2.shape[1], w.packed.shape[0]
    y = torch.empty(x2.shape[0], n, dtype=x2.dtype, device=x2.device)
    for col0, col1 in _tiles(k, n, 4):
        y[:, col0:col1] = x2 @ dequantize_columns(w, k, col0, col1, x2.dtype)
    return y


def int4pack_linear(x: torch.Tensor, packed: torch.Tensor, scale_offset: torch.Tensor, bias: torch.Tensor | None,
                    group_size: int, max_rows: int) -> torch.Tensor:
    """x [..., K] @ W^T + bias; the int4-pack kernel for at most `max_rows` rows, tiles beyond."""
    w = Int4PackWeights(packed, scale_offset, group_size)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] <= max_rows and scale_offset.dtype == x2.dtype:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, group_size, scale_offset)
    else:
        y = tiled_linear(x2, w)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], packed.shape[0])


@torch.library.custom_op("signround::int4pack_linear", mutates_args=())
def _int4pack_linear_op(x: torch.Tensor, packed: torch.Tensor, scale_offset: torch.Tensor,
                        bias: torch.Tensor | None, group_size: int, max_rows: int) -> torch.Tensor:
    return int4pack_linear(x, packed, scale_offset, bias, group_size, max_rows)


@_int4pack_linear_op.register_fake
def _(x, packed, scale_offset, bias, group_size, max_rows):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


@functools.cache
def layout_understood() -> bool:
    """Whether this torch's int4-pack layout is the one `_blocks` and `_unpack_tail` read (checked once, on a
    small matrix with a 64-column block and a tail)."""
    try:
        n, k = 80, 64
        q = (torch.arange(n * k, dtype=torch.int32).view(n, k) * 7) % 16
        w = Int4PackWeights(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1),
                            torch.zeros(1, n, 2), 64)
        blocks = _blocks(w, k)
        got = torch.cat([torch.cat([blocks & 15, blocks >> 4], dim=-1).permute(1, 0, 2).reshape(k, 64),
                         _unpack_tail(w, k)], dim=1)
        return torch.equal(got.t().to(torch.int32), q)
    except (RuntimeError, AttributeError):
        return False
