"""The CPU int4-pack path (`signround_vllm.cpu_int4`) against the format's own pure-torch dequantization.

Reference: the format's dequantized weights in float64. The fast path rounds scales to the
activation dtype: re-centred layers (2/3 bits, symmetric 4 bits) must stay within bf16's unit
roundoff of each weight, asymmetric 4-bit ones within (|q - 7.5| + |offset| / scale) * 2^-8 <= 1/16
of a quantization step (the bound the module doc derives); the exact path must give the
dequantized weights rounded once.
"""
import pytest
import torch

from signround_vllm import cpu_int4
from signround_vllm.format import LayerQuantSpec, dequantize_packed, pack_linear

SPECS = [LayerQuantSpec(b, g, sym) for b in (2, 3, 4) for g in (32, 64, 128, -1) for sym in (False, True)]


def random_layer(spec, n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    groups = k // spec.effective_group_size(k)
    q = torch.randint(0, 1 << spec.bits, (n, k), generator=gen)
    scales = torch.rand(n, groups, generator=gen) * 0.02 + 1e-3
    zeros = None if spec.sym else torch.randint(0, 1 << spec.bits, (n, groups), generator=gen)
    return pack_linear(q, scales, zeros, spec)


def weights_of(w: cpu_int4.Int4PackWeights, k: int, n: int) -> torch.Tensor:
    """W [N, K] in float32 as the tile path sees it, over every tile (blocks and tail)."""
    return torch.cat([cpu_int4.dequantize_columns(w, k, a, b, torch.float32)
                      for a, b in cpu_int4._tiles(k, n, 4)], dim=1).t()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short_name())
@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_weights_held_by_the_int4_pack_path(spec, act_dtype):
    k = 384  # 3 groups of 128; per-channel layers are held as groups of 128
    n = 64 + 48  # one block of 64 columns and a tail
    packed = random_layer(spec, n, k, seed=spec.bits * 100 + spec.group_size)
    exact = dequantize_packed(packed, torch.float64)
    steps = packed.scales.to(torch.float64).repeat_interleave(spec.effective_group_size(k), 0).t()  # [N, K]

    exact_path = cpu_int4.to_int4pack(packed, act_dtype, exact=True)
    held_exact = weights_of(exact_path, k, n)
    assert torch.equal(held_exact.to(act_dtype), exact.to(act_dtype))  # one rounding, the reference's
    eager = cpu_int4.dequantize_columns(exact_path, k, 0, 64, act_dtype, compiled=False)
    assert torch.equal(eager, cpu_int4.dequantize_columns(exact_path, k, 0, 64, act_dtype))

    held = weights_of(cpu_int4.to_int4pack(packed, act_dtype), k, n).to(torch.float64)
    error_in_steps = ((held - exact).abs() / steps).max().item()
    bound = {torch.bfloat16: 16 / 256, torch.float16: 16 / 2048}[act_dtype]
    assert error_in_steps <= bound
    if spec.bits < 4 or spec.sym:  # re-centred integers: no offset, only the scale's rounding
        unit_roundoff = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[act_dtype]
        assert torch.allclose(held, exact, rtol=unit_roundoff, atol=0)


@pytest.mark.parametrize("m", [1, 3, 8, 17, 130])
@pytest.mark.parametrize("spec", [LayerQuantSpec(4, 128, False), LayerQuantSpec(3, 64, True),
                                  LayerQuantSpec(2, 32, False), LayerQuantSpec(4, -1, True)],
                         ids=lambda s: s.short_name())
def test_both_paths_give_x_times_dequantized_weights(spec, m):
    k, n = 256 + 128, 64 * 2 + 16
    packed = random_layer(spec, n, k, seed=m)
    w_ref = dequantize_packed(packed, torch.float64)
    bias = torch.randn(n, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(m + 1)
    x = torch.randn(2, m, k, generator=gen).to(torch.bfloat16)  # 3-D input, as vLLM may pass
    ref = x.to(torch.float64) @ w_ref.t() + bias.to(torch.float64)
    scale = ref.abs().max().item()
    for exact in (False, True):
        w = cpu_int4.to_int4pack(packed, torch.bfloat16, exact=exact)
        for max_rows in (0, 10_000):  # tiles, and the kernel wherever the table allows it
            y = torch.ops.signround.int4pack_linear(x, w.packed, w.scale_offset, bias, w.group_size, max_rows)
            assert y.shape == (2, m, n) and y.dtype == torch.bfloat16 and not y.isnan().any()
            assert (y.to(torch.float64) - ref).abs().max().item() <= 0.02 * scale, (exact, max_rows)


def test_kernel_and_tiles_agree_within_bf16_rounding():
    spec = LayerQuantSpec(4, 128, False)
    k, n = 1024, 256
    packed = random_layer(spec, n, k, seed=7)
    w = cpu_int4.to_int4pack(packed, torch.bfloat16)
    x = torch.randn(4, k).to(torch.bfloat16)
    kernel = cpu_int4.int4pack_linear(x, w.packed, w.scale_offset, None, w.group_size, max_rows=4)
    tiles = cpu_int4.int4pack_linear(x, w.packed, w.scale_offset, None, w.group_size, max_rows=0)
    ref = x.float() @ dequantize_packed(packed).t()
    rel = ((kernel.float() - tiles.float()).abs().max() / ref.abs().max()).item()
    assert rel < 2 ** -6


def test_operator_is_compile_safe():
    spec = LayerQuantSpec(4, 64, True)
    packed = random_layer(spec, 64, 128, seed=3)
    w = cpu_int4.to_int4pack(packed, torch.bfloat16)
    x = torch.randn(5, 128).to(torch.bfloat16)
    args = (x, w.packed, w.scale_offset, None, w.group_size, cpu_int4.max_rows_for(2))
    torch.library.opcheck(torch.ops.signround.int4pack_linear, args)
    f = torch.compile(lambda x: torch.ops.signround.int4pack_linear(x, *args[1:]), fullgraph=True, backend="eager")
    assert torch.equal(f(x), torch.ops.signround.int4pack_linear(*args))


def test_what_the_kernel_cannot_hold_is_named():
    assert cpu_int4.can_hold(LayerQuantSpec(8, 128, False), 256, 64) == (
        False, "the int4-pack kernel holds at most 4 bits per weight (layer has 8)")
    ok, why = cpu_int4.can_hold(LayerQuantSpec(4, 128, False), 256, 72)
    assert not ok and "divisible by 16 (got 72)" in why
    ok, why = cpu_int4.can_hold(LayerQuantSpec(4, -1, False), 48, 64)  # per channel, K = 48: no group divides
    assert not ok and "takes groups of [32, 64, 128, 256]" in why
    assert cpu_int4.kernel_group_size(LayerQuantSpec(4, -1, False), 384) == 128
    assert cpu_int4.layout_understood()


def test_threshold_follows_the_cpu_and_threads_it_was_measured_with():
    table = cpu_int4.INT4PACK_MAX_ROWS["avx512"]
    assert cpu_int4.max_rows_for(1, "avx512") == table[1] and cpu_int4.max_rows_for(2, "avx512") == table[2]
    assert cpu_int4.max_rows_for(64, "avx512") == table[max(table)]  # beyond the table: the largest measured
    assert cpu_int4.max_rows_for(2, "amx") == cpu_int4.INT4PACK_MAX_ROWS["amx"][1]
    assert cpu_int4.max_rows_for(1) == cpu_int4.INT4PACK_MAX_ROWS[cpu_int4.cpu_kind()][1]
