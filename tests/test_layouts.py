"""Tier 1 (exact): SignRound integers repacked into the layouts vLLM's kernels read, checked against
independent unpackers (bit arrays from numpy, and vLLM's own unpacker where it has one)."""
import numpy as np
import pytest
import torch

from signround_vllm.format import LayerQuantSpec, dequantize_packed, pack_linear
from signround_vllm.layouts import pack_stream_rows, to_compressed_tensors, widen_to_4_bits

BITS = (2, 3, 4, 8)


def unpack_bit_streams(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """int32 [R, W]: each row one little-endian bit stream -> its first `count` integers [R, count]."""
    raw = words.contiguous().numpy().astype("<i4").view(np.uint8)  # [R, 4W], little-endian bytes
    stream = np.unpackbits(raw, axis=1, bitorder="little")  # [R, 32W]: bit j of word w at 32w + j
    assert stream.shape[1] >= count * bits, "stream too short"
    chunks = stream[:, : count * bits].reshape(len(stream), count, bits).astype(np.int64)
    return torch.from_numpy((chunks << np.arange(bits)).sum(axis=2))


def random_layer(bits, group_size, sym, n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    spec = LayerQuantSpec(bits, group_size, sym)
    groups = k // spec.effective_group_size(k)
    q = torch.randint(0, 1 << bits, (n, k), generator=gen)
    scales = (torch.rand(n, groups, generator=gen) - 0.5) * 0.02  # both signs
    zeros = None if sym else torch.randint(0, 1 << bits, (n, groups), generator=gen)
    return q, zeros, pack_linear(q, scales, zeros, spec)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("n", [32, 72, 100])
def test_compressed_tensors_layout_holds_the_same_integers(bits, sym, n):
    k, group_size = 256, 64
    q, zeros, packed = random_layer(bits, group_size, sym, n, k, seed=bits * 100 + n)
    ct = to_compressed_tensors(packed, torch.bfloat16)
    assert ct.weight_packed.dtype == torch.int32 and ct.weight_packed.shape == (n, -(-k * bits // 32))
    assert torch.equal(unpack_bit_streams(ct.weight_packed, bits, k), q)
    assert ct.weight_scale.shape == (n, k // group_size) and ct.weight_scale.dtype == torch.bfloat16
    assert torch.equal(ct.weight_scale, packed.scales.t().to(torch.bfloat16))
    if sym:
        assert ct.weight_zero_point is None
    else:
        z = ct.weight_zero_point
        assert z.dtype == torch.int32 and z.shape == (-(-n * bits // 32), k // group_size)
        assert torch.equal(unpack_bit_streams(z.t(), bits, n).t(), zeros)


@pytest.mark.parametrize("bits", [4, 8])
def test_vllm_reads_the_same_integers(bits):
    """vLLM's own unpacker for the power-of-two widths (what its kernels' repacking starts from)."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32
    from vllm.scalar_type import scalar_types

    k, n = 128, 64
    q, zeros, packed = random_layer(bits, 32, False, n, k, seed=7)
    ct = to_compressed_tensors(packed, torch.float16)
    wtype = getattr(scalar_types, f"uint{bits}")
    assert torch.equal(unpack_quantized_values_into_int32(ct.weight_packed, wtype, packed_dim=1).long(), q)
    assert torch.equal(unpack_quantized_values_into_int32(ct.weight_zero_point, wtype, packed_dim=0).long(),
                       zeros)


def test_stream_packing_cuts_the_padding_words():
    values = torch.randint(0, 8, (40, 5), generator=torch.Generator().manual_seed(1))
    words = pack_stream_rows(values, 3)
    assert words.shape == (4, 5)  # ceil(40 * 3 / 32) = 4, not the 6 words of two whole runs
    assert torch.equal(unpack_bit_streams(words.t(), 3, 40).t(), values)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_widening_to_4_bits_keeps_every_weight(bits, sym):
    _, _, packed = random_layer(bits, 32, sym, 48, 128, seed=bits)
    wide = widen_to_4_bits(packed)
    assert wide.spec == LayerQuantSpec(4, 32, False)
    assert torch.equal(dequantize_packed(wide), dequantize_packed(packed))
