"""The SignRound integers in the layouts other code reads, converted exactly (no rounding).

compressed-tensors `pack-quantized`, the layout vLLM's `CompressedTensorsWNA16` declares and every
mixed-precision kernel it chooses (Machete, Marlin, Humming, CPUWNA16, ...) takes:

  weight_packed      int32 [N, ceil(K * b / 32)]   each output row's K integers as one little-endian
                                                   bit stream (integer i at stream bits [i*b, i*b + b),
                                                   stream bit j is bit j % 32 of word j // 32)
  weight_scale       [N, K // G]                   the scales, in the activation dtype
  weight_zero_point  int32 [ceil(N * b / 32), K // G]   per group, the N zero points as one such
                                                   stream (asymmetric layers only; symmetric ones
                                                   imply 2^(b-1), the `uint{b}b{2^(b-1)}` types)

A SignRound `qweight` column holds its K integers as runs of 32, each run exactly b words of the
same little-endian stream, so `weight_packed` is `qweight` transposed, at every bit width.
"""
from __future__ import annotations

import dataclasses

import torch

from signround_vllm.format import PACK_RUN, WORD_BITS, LayerQuantSpec, PackedLinear, pack_int_weights, \
    unpack_int_weights


@dataclasses.dataclass
class CompressedTensorsLinear:
    weight_packed: torch.Tensor  # int32 [N, K * b / 32]
    weight_scale: torch.Tensor  # [N, K / G]
    weight_zero_point: torch.Tensor | None  # int32 [ceil(N * b / 32), K / G]; None when symmetric
    bits: int

    @property
    def pack_factor(self):
        """Integers per int32 word, as vLLM's parameters state it (a Fraction at 3 bits)."""
        from fractions import Fraction

        return WORD_BITS // self.bits if WORD_BITS % self.bits == 0 else Fraction(WORD_BITS, self.bits)


def pack_stream_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers [R, C] in [0, 2^bits) -> int32 [ceil(R * bits / 32), C]: each column one bit stream."""
    rows = values.shape[0]
    padded = -(-rows // PACK_RUN) * PACK_RUN
    if padded != rows:  # zero integers beyond the end fill the last run; its words past the stream are cut
        values = torch.cat([values, values.new_zeros(padded - rows, values.shape[1])])
    return pack_int_weights(values, bits)[: -(-rows * bits // WORD_BITS)]


def to_compressed_tensors(packed: PackedLinear, scale_dtype: torch.dtype) -> CompressedTensorsLinear:
    """The same layer in compressed-tensors' pack-quantized layout (see the module doc)."""
    bits = packed.spec.bits
    zero_point = None
    if packed.qzeros is not None:
        zero_point = pack_stream_rows(packed.qzeros.t().to(torch.int64), bits)  # [ceil(N*b/32), K/G]
    return CompressedTensorsLinear(weight_packed=packed.qweight.t().contiguous(),
                                   weight_scale=packed.scales.t().to(scale_dtype).contiguous(),
                                   weight_zero_point=zero_point, bits=bits)


def widen_to_4_bits(packed: PackedLinear) -> PackedLinear:
    """A 2- or 3-bit layer as a 4-bit asymmetric one with the same integers and zero points (exact)."""
    spec = packed.spec
    if spec.bits >= 4:
        raise ValueError(f"widen_to_4_bits: the layer already has {spec.bits} bits")
    q = unpack_int_weights(packed.qweight, spec.bits)  # uint8 [K, N]
    return PackedLinear(qweight=pack_int_weights(q, 4), scales=packed.scales, qzeros=packed.zero_points(),
                        spec=LayerQuantSpec(4, spec.group_size, False))
