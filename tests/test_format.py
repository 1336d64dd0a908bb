"""Tier 1: the packed format, exact (atol=0)."""
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from signround_vllm.format import (
    SUPPORTED_BITS, LayerQuantSpec, PackedLinear, SignRoundConfig, SignRoundFormatError, dequantize_packed,
    pack_int_weights, pack_linear, packed_tensor_specs, unpack_int_weights, validate_layer_tensors,
)


def naive_pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Independent reference: build the bit stream one bit at a time."""
    k, n = q.shape
    out = torch.zeros(k * bits // 32, n, dtype=torch.int64)
    for col in range(n):
        for row in range(k):
            value = int(q[row, col])
            for b in range(bits):
                stream_bit = (row // 32) * 32 * bits + (row % 32) * bits + b
                if (value >> b) & 1:
                    out[stream_bit // 32, col] |= 1 << (stream_bit % 32)
    return torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_pack_matches_bitwise_reference(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2 ** bits, (64, 3), generator=g)
    assert torch.equal(pack_int_weights(q, bits), naive_pack(q, bits))


def test_four_bit_order_is_gptq_order():
    # Integer i of a word sits at bits [4i, 4i+4): the order GPTQ and vLLM's CPU kernel use.
    q = torch.arange(32).remainder(16).reshape(32, 1)
    words = pack_int_weights(q, 4)
    assert words.shape == (4, 1)
    assert int(words[0, 0]) == 0x76543210


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(SUPPORTED_BITS), runs=st.integers(1, 5), n=st.integers(1, 37), seed=st.integers(0, 2 ** 31))
def test_pack_unpack_round_trip(bits, runs, n, seed):
    q = torch.randint(0, 2 ** bits, (runs * 32, n), generator=torch.Generator().manual_seed(seed))
    packed = pack_int_weights(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (runs * bits, n)
    assert torch.equal(unpack_int_weights(packed, bits).to(torch.int64), q)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(SUPPORTED_BITS), words=st.lists(st.integers(-2 ** 31, 2 ** 31 - 1), min_size=1, max_size=8))
def test_unpack_pack_round_trip_of_any_words(bits, words):
    # Every int32 bit pattern is a valid packing: unpack then pack gives the same words back.
    packed = torch.tensor(words * bits, dtype=torch.int32).reshape(bits * len(words), 1)
    assert torch.equal(pack_int_weights(unpack_int_weights(packed, bits), bits), packed)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [False, True])
def test_dequantize_matches_formula(bits, group_size, sym):
    gen = torch.Generator().manual_seed(bits * 100 + group_size)
    k, n = 256, 24
    spec = LayerQuantSpec(bits, group_size, sym)
    gsz = spec.effective_group_size(k)
    q = torch.randint(0, 2 ** bits, (n, k), generator=gen)
    scales = torch.randn(n, k // gsz, generator=gen).to(torch.float16).float()  # includes negative scales
    zeros = None if sym else torch.randint(0, 2 ** bits, (n, k // gsz), generator=gen)
    packed = pack_linear(q, scales, zeros, spec)
    w = dequantize_packed(packed)
    for row in range(0, n, 7):
        for col in range(0, k, 13):
            z = spec.sym_zero_point if sym else int(zeros[row, col // gsz])
            expect = (int(q[row, col]) - z) * float(scales[row, col // gsz])
            assert float(w[row, col]) == pytest.approx(expect, abs=0, rel=1e-6)
    assert packed.in_features == k and packed.out_features == n


def test_config_round_trip():
    c = SignRoundConfig(default=LayerQuantSpec(3, 64, True), modules_to_not_convert=("lm_head",),
                        layer_overrides={"model.layers.0.mlp.down_proj": LayerQuantSpec(8, 64, True),
                                         "model.layers.1.self_attn.q_proj": LayerQuantSpec(4, -1, False)},
                        tuner={"method": "rtn"})
    d = json.loads(json.dumps(c.to_dict()))
    assert d["quant_method"] == "signround" and d["format_version"] == 1
    assert d["layer_overrides"]["model.layers.0.mlp.down_proj"] == {"bits": 8}
    assert SignRoundConfig.from_dict(d) == c
    assert c.spec_for("lm_head") is None
    assert c.spec_for("model.layers.0.mlp.down_proj").bits == 8
    assert c.spec_for("model.layers.0.mlp.up_proj") == LayerQuantSpec(3, 64, True)


@pytest.mark.parametrize("bad, words", [
    ({"bits": 5}, "bits=5"),
    ({"bits": "4"}, "bits='4'"),
    ({"group_size": 48}, "group_size=48"),
    ({"group_size": 0}, "group_size=0"),
    ({"sym": "yes"}, "sym='yes'"),
    ({"quant_method": "gptq"}, "quant_method='gptq'"),
    ({"format_version": 7}, "format_version=7"),
    ({"desc_act": True}, "unknown quantization_config keys ['desc_act']"),
    ({"layer_overrides": {"x": {"bits": 6}}}, "layer_overrides['x']: bits=6"),
    ({"layer_overrides": {"x": {"act_order": 1}}}, "layer_overrides['x']"),
    ({"modules_to_not_convert": "lm_head"}, "modules_to_not_convert must be a list"),
])
def test_bad_configs_are_rejected_with_the_setting_named(bad, words):
    d = {**SignRoundConfig().to_dict(), **bad}
    with pytest.raises(SignRoundFormatError) as e:
        SignRoundConfig.from_dict(d)
    assert words in str(e.value)
    assert "supported" in str(e.value) or "expected" in str(e.value) or "accepted" in str(e.value) \
        or "must" in str(e.value)


def test_mismatched_tensors_are_rejected():
    spec = LayerQuantSpec(4, 32, False)
    good = {name: torch.zeros(shape, dtype=dtype) for name, (shape, dtype) in packed_tensor_specs(64, 16, spec).items()}
    validate_layer_tensors("L", good, spec, 64, 16)
    with pytest.raises(SignRoundFormatError, match=r"L.scales: found torch.float32"):
        validate_layer_tensors("L", {**good, "scales": good["scales"].float()}, spec, 64, 16)
    with pytest.raises(SignRoundFormatError, match=r"L.qweight: found torch.int32 \(9, 16\)"):
        validate_layer_tensors("L", {**good, "qweight": torch.zeros(9, 16, dtype=torch.int32)}, spec, 64, 16)
    missing = {k: v for k, v in good.items() if k != "qzeros"}
    with pytest.raises(SignRoundFormatError, match=r"missing tensors \['L.qzeros'\]"):
        validate_layer_tensors("L", missing, spec, 64, 16)
    with pytest.raises(SignRoundFormatError, match="does not divide in_features=96"):
        packed_tensor_specs(96, 16, LayerQuantSpec(4, 64, False), "L")
    with pytest.raises(SignRoundFormatError, match="not a multiple of 32"):
        packed_tensor_specs(40, 16, LayerQuantSpec(4, -1, False), "L")


def test_pack_rejects_out_of_range_and_float():
    with pytest.raises(SignRoundFormatError, match="out of range for 3 bits"):
        pack_int_weights(torch.full((32, 1), 8), 3)
    with pytest.raises(SignRoundFormatError, match="integer tensor"):
        pack_int_weights(torch.zeros(32, 1), 4)
    with pytest.raises(SignRoundFormatError, match="K % 32 == 0"):
        pack_int_weights(torch.zeros(31, 1, dtype=torch.int64), 4)
    with pytest.raises(SignRoundFormatError, match="bits=5"):
        pack_int_weights(torch.zeros(32, 1, dtype=torch.int64), 5)


def test_packed_linear_tensor_names():
    spec = LayerQuantSpec(2, 32, True)
    p = pack_linear(torch.zeros(8, 64, dtype=torch.int64), torch.ones(8, 2), None, spec)
    assert sorted(p.tensors("m.x")) == ["m.x.qweight", "m.x.scales"]
    assert isinstance(p, PackedLinear) and p.qweight.shape == (4, 8)


_SPEC_VALUES = st.one_of(st.integers(-3, 260), st.booleans(), st.text(max_size=4), st.none(), st.floats(0, 8))


@settings(max_examples=300, deadline=None)
@given(d=st.dictionaries(
    st.sampled_from(["quant_method", "format_version", "bits", "group_size", "sym", "modules_to_not_convert",
                     "layer_overrides", "tuner", "desc_act"]),
    st.one_of(_SPEC_VALUES, st.lists(st.text(max_size=6), max_size=3),
              st.dictionaries(st.text(max_size=8), st.dictionaries(
                  st.sampled_from(["bits", "group_size", "sym", "zero"]), _SPEC_VALUES, max_size=3), max_size=2))))
def test_fuzz_config_parsing_round_trips_or_refuses(d):
    d = {"quant_method": "signround", "format_version": 1, **d} if d.get("quant_method") is None else d
    try:
        config = SignRoundConfig.from_dict(d)
    except SignRoundFormatError:
        return
    assert SignRoundConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
