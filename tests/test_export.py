"""compressed-tensors / GPTQ / AWQ export: exact repacking (atol=0), refusals, and vLLM's built-in methods
serving the result."""
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from offline_tuner.cli import main
from offline_tuner.export import (
    ExportError, awq_layer_tensors, awq_refusal, export_checkpoint, gptq_layer_tensors, gptq_refusal,
)
from signround_vllm.checkpoint import load_tensors, read_config, write_model_folder
from signround_vllm.format import LayerQuantSpec, SignRoundConfig, pack_linear
from tests.vllm_utils import run_reporting_script

ROOT = Path(__file__).resolve().parents[1]
# The AWQ word slot (bits [4j, 4j + 4)) of each column n % 8: AWQ packs columns [0, 2, 4, 6, 1, 3, 5, 7].
AWQ_SLOT_OF_COLUMN = [0, 4, 1, 5, 2, 6, 3, 7]


# ----------------------------------------------------------------------------
# Independent references: one integer at a time, by index arithmetic
# ----------------------------------------------------------------------------
def unpack_gptq_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R * bits / 32, C], integer i of a word at bits [i*bits, ...) -> int64 [R, C]."""
    per_word = 32 // bits
    rows = torch.arange(words.shape[0] * per_word)
    w = (words.to(torch.int64) & 0xFFFFFFFF)[rows // per_word]  # [R, C]
    shift = ((rows % per_word) * bits).unsqueeze(1)
    return (w >> shift) & ((1 << bits) - 1)


def unpack_gptq_cols(words: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_gptq_rows(words.t(), bits).t()


def unpack_awq_cols(words: torch.Tensor) -> torch.Tensor:
    """AWQ int32 [R, C / 8] -> int64 [R, C]: column n sits in word n // 8, slot AWQ_SLOT_OF_COLUMN[n % 8]."""
    cols = torch.arange(words.shape[1] * 8)
    w = (words.to(torch.int64) & 0xFFFFFFFF)[:, cols // 8]  # [R, C]
    shift = torch.tensor(AWQ_SLOT_OF_COLUMN)[cols % 8] * 4
    return (w >> shift) & 0xF


def random_layer(n: int, k: int, spec: LayerQuantSpec, seed: int):
    """(q [N, K], signed float16 scales [N, K/G], zeros [N, K/G] or None) and the packed layer."""
    g = torch.Generator().manual_seed(seed)
    groups = k // spec.effective_group_size(k)
    q = torch.randint(0, 2 ** spec.bits, (n, k), generator=g)
    scales = (torch.randn(n, groups, generator=g) * 0.01).to(torch.float16)  # about half negative
    zeros = None if spec.sym else torch.randint(0, 2 ** spec.bits, (n, groups), generator=g)
    return q, scales, zeros, pack_linear(q, scales, zeros, spec)


# ----------------------------------------------------------------------------
# Tier 1: exact, one layer
# ----------------------------------------------------------------------------
# (N, K, group size): N a multiple of 8 but mostly not of 32, K a multiple of 32 but not always of 64.
AWKWARD_SIZES = [(8, 32, 32), (40, 96, 32), (136, 64, 64), (24, 224, 32), (200, 128, 128), (72, 384, 128),
                 (40, 96, -1), (8, 32, -1), (264, 256, 64)]


@pytest.mark.parametrize("n,k,group_size", AWKWARD_SIZES)
@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_tensors_hold_the_same_integers_and_scales(n, k, group_size, bits):
    spec = LayerQuantSpec(bits, group_size, sym=True)
    q, scales, _, packed = random_layer(n, k, spec, seed=n * k + bits)
    t = gptq_layer_tensors(packed)
    g = spec.effective_group_size(k)
    assert set(t) == {"qweight", "qzeros", "scales", "g_idx"}
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (k * bits // 32, n)
    assert t["qzeros"].dtype == torch.int32 and t["qzeros"].shape == (k // g, n * bits // 32)
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (k // g, n)
    assert torch.equal(unpack_gptq_rows(t["qweight"], bits), q.t())
    # v1: stored zero point = (implied zero point 2^(b-1)) - 1, so w = (q - 2^(b-1)) * s.
    assert torch.equal(unpack_gptq_cols(t["qzeros"], bits) + 1, torch.full((k // g, n), 2 ** (bits - 1)))
    assert torch.equal(t["scales"].view(torch.int16), scales.t().contiguous().view(torch.int16))  # bitwise
    assert torch.equal(t["g_idx"], torch.arange(k, dtype=torch.int32) // g)


@pytest.mark.parametrize("n,k,group_size", AWKWARD_SIZES)
@pytest.mark.parametrize("sym", [False, True])
def test_awq_tensors_hold_the_same_integers_zeros_and_scales(n, k, group_size, sym):
    spec = LayerQuantSpec(4, group_size, sym)
    q, scales, zeros, packed = random_layer(n, k, spec, seed=n + k + sym)
    t = awq_layer_tensors(packed)
    g = spec.effective_group_size(k)
    assert set(t) == {"qweight", "qzeros", "scales"}
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (k, n // 8)
    assert t["qzeros"].dtype == torch.int32 and t["qzeros"].shape == (k // g, n // 8)
    assert torch.equal(unpack_awq_cols(t["qweight"]), q.t())
    expected_zeros = torch.full((k // g, n), 8) if sym else zeros.t()  # symmetric: implied 8, stored
    assert torch.equal(unpack_awq_cols(t["qzeros"]), expected_zeros)
    assert torch.equal(t["scales"].view(torch.int16), scales.t().contiguous().view(torch.int16))


def test_awq_word_order_is_interleaved():
    # Columns 0..7 holding 0..7: slots hold columns [0, 2, 4, 6, 1, 3, 5, 7] -> 0x75316420.
    spec = LayerQuantSpec(4, -1, False)
    q = torch.arange(8).repeat(32, 1).t().contiguous()  # [N=8, K=32], row n is all n
    packed = pack_linear(q, torch.ones(8, 1), torch.zeros(8, 1), spec)
    assert int(awq_layer_tensors(packed)["qweight"][0, 0]) == 0x75316420
    # GPTQ packs along K in plain order: rows 0..7 holding 0..7 -> 0x76543210.
    q = torch.arange(32).remainder(8).repeat(8, 1)  # [8, 32], column k is k % 8
    packed = pack_linear(q, torch.ones(8, 1), None, LayerQuantSpec(4, -1, True))
    assert int(gptq_layer_tensors(packed)["qweight"][0, 0]) == 0x76543210


@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(["gptq", "awq"]), bits=st.sampled_from([4, 8]), sym=st.booleans(),
       runs=st.integers(1, 4), n8=st.integers(1, 9), seed=st.integers(0, 2 ** 31))
def test_export_reproduces_the_dequantized_weight(fmt, bits, sym, runs, n8, seed):
    """Dequantizing the exported tensors the way each format defines gives SignRound's weight exactly."""
    from signround_vllm.format import dequantize_packed

    spec = LayerQuantSpec(bits, 32, sym)
    refusal = (gptq_refusal if fmt == "gptq" else awq_refusal)(spec, n8 * 8)
    k, n = runs * 32, n8 * 8
    _, _, _, packed = random_layer(n, k, spec, seed)
    if refusal:
        with pytest.raises(ExportError):
            (gptq_layer_tensors if fmt == "gptq" else awq_layer_tensors)(packed)
        return
    if fmt == "gptq":
        t = gptq_layer_tensors(packed)
        q, z = unpack_gptq_rows(t["qweight"], bits), unpack_gptq_cols(t["qzeros"], bits) + 1
    else:
        t = awq_layer_tensors(packed)
        q, z = unpack_awq_cols(t["qweight"]), unpack_awq_cols(t["qzeros"])
    s = t["scales"].float()
    w = (q - z.repeat_interleave(32, 0)) * s.repeat_interleave(32, 0)  # [K, N]
    assert torch.equal(w.t(), dequantize_packed(packed, torch.float32))


# ----------------------------------------------------------------------------
# Refusals, one layer
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("bits,sym,words", [
    (3, False, "3-bit asymmetric"), (2, True, "2-bit symmetric"), (4, False, "4-bit asymmetric"),
    (8, False, "8-bit asymmetric"), (3, True, "3-bit symmetric"),
])
def test_gptq_refuses_what_vllm_cannot_load(bits, sym, words):
    message = gptq_refusal(LayerQuantSpec(bits, 128, sym), 256)
    assert "GPTQ in vLLM 0.32 holds symmetric 4- and 8-bit layers only" in message and words in message


@pytest.mark.parametrize("bits,sym,words", [(8, True, "8-bit symmetric"), (3, False, "3-bit asymmetric"),
                                            (2, True, "2-bit symmetric")])
def test_awq_refuses_what_vllm_cannot_load(bits, sym, words):
    message = awq_refusal(LayerQuantSpec(bits, 64, sym), 256)
    assert "AWQ in vLLM 0.32 holds 4-bit layers only" in message and words in message


def test_output_size_must_fill_whole_words():
    assert "out_features=36" in gptq_refusal(LayerQuantSpec(4, 32, True), 36)
    assert gptq_refusal(LayerQuantSpec(8, 32, True), 36) is None  # 4 per word at 8 bits
    assert "out_features=36" in awq_refusal(LayerQuantSpec(4, 32, False), 36)
    _, _, _, packed = random_layer(36, 64, LayerQuantSpec(4, 32, False), 0)
    with pytest.raises(ExportError, match="my.layer: AWQ packs 8 integers"):
        awq_layer_tensors(packed, "my.layer")


# ----------------------------------------------------------------------------
# Whole checkpoints (synthetic, no model needed)
# ----------------------------------------------------------------------------
HIDDEN, INTER = 64, 96
SHAPES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (32, HIDDEN), "self_attn.v_proj": (32, HIDDEN),
          "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
          "mlp.down_proj": (HIDDEN, INTER)}


def make_checkpoint(path, config: SignRoundConfig, layers: int = 2, seed: int = 0):
    """A checkpoint folder with Llama-like names, random packed layers, and the raw integers per layer."""
    tensors = {"model.embed_tokens.weight": torch.randn(50, HIDDEN, dtype=torch.bfloat16),
               "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16)}
    raw = {}
    for i in range(layers):
        for j, (leaf, (n, k)) in enumerate(SHAPES.items()):
            name = f"model.layers.{i}.{leaf}"
            spec = config.spec_for(name)
            if spec is None:
                tensors[f"{name}.weight"] = torch.randn(n, k, dtype=torch.bfloat16)
                continue
            q, scales, zeros, packed = random_layer(n, k, spec, seed=seed + 10 * i + j)
            raw[name] = (q, scales, zeros, spec)
            tensors.update(packed.tensors(name))
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    hf = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
          "torch_dtype": "bfloat16", "quantization_config": config.to_dict()}
    write_model_folder(path, tensors, hf)
    return path, raw, tensors


def check_exported_integers(out, raw, fmt):
    t = load_tensors(out)
    for name, (q, scales, zeros, spec) in raw.items():
        k = q.shape[1]
        g = spec.effective_group_size(k)
        expected_zeros = torch.full((k // g, q.shape[0]), spec.sym_zero_point) if zeros is None else zeros.t()
        if fmt == "gptq":
            got_q = unpack_gptq_rows(t[f"{name}.qweight"], spec.bits)
            got_z = unpack_gptq_cols(t[f"{name}.qzeros"], spec.bits) + 1
        else:
            got_q, got_z = unpack_awq_cols(t[f"{name}.qweight"]), unpack_awq_cols(t[f"{name}.qzeros"])
        assert torch.equal(got_q, q.t()), name
        assert torch.equal(got_z, expected_zeros), name
        assert torch.equal(t[f"{name}.scales"], scales.t()), name
    return t


def test_gptq_checkpoint_with_per_layer_settings_and_unquantized_modules(tmp_path):
    config = SignRoundConfig(
        default=LayerQuantSpec(4, 32, True), modules_to_not_convert=("lm_head", "model.layers.1.mlp.down_proj"),
        layer_overrides={**{f"model.layers.0.self_attn.{p}_proj": LayerQuantSpec(8, 64, True) for p in "qkv"},
                         "model.layers.1.mlp.gate_proj": LayerQuantSpec(4, -1, True),
                         "model.layers.1.mlp.up_proj": LayerQuantSpec(4, -1, True)})
    ckpt, raw, source = make_checkpoint(tmp_path / "ckpt", config)
    messages = []
    out = export_checkpoint(ckpt, tmp_path / "gptq", "gptq", progress=messages.append)
    t = check_exported_integers(out, raw, "gptq")
    assert torch.equal(t["model.layers.1.mlp.down_proj.weight"], source["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(t["model.embed_tokens.weight"], source["model.embed_tokens.weight"])
    qc = read_config(out)["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format")} == \
        {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": False,
         "checkpoint_format": "gptq"}

    def rule_for(vllm_name):
        # vLLM's get_dynamic_override: the first rule whose regex re.match-es the (fused) layer name.
        for pattern, values in qc["dynamic"].items():
            if re.match(pattern[2:], vllm_name):
                return pattern[:2], values
        return None

    assert rule_for("model.layers.0.self_attn.qkv_proj") == ("+:", {"bits": 8, "group_size": 64})
    assert rule_for("model.layers.0.self_attn.k_proj") == ("+:", {"bits": 8, "group_size": 64})
    assert rule_for("model.layers.1.mlp.gate_up_proj") == ("+:", {"bits": 4, "group_size": -1})
    assert rule_for("model.layers.1.mlp.down_proj") == ("-:", {})
    for name in ("model.layers.1.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj",
                 "model.layers.0.mlp.down_proj", "model.layers.10.self_attn.qkv_proj", "model.layers.11.mlp.down_proj"):
        assert rule_for(name) is None, name
    assert any("8-bit GPTQ layers with CUDA kernels only" in m for m in messages)
    assert json.loads((out / "signround_export.json").read_text())["format"] == "gptq"


def test_awq_checkpoint_with_mixed_symmetry_and_unquantized_modules(tmp_path):
    config = SignRoundConfig(default=LayerQuantSpec(4, 32, False),
                             modules_to_not_convert=("lm_head", "model.layers.0.mlp.down_proj"),
                             layer_overrides={"model.layers.1.self_attn.o_proj": LayerQuantSpec(4, 32, True)})
    ckpt, raw, source = make_checkpoint(tmp_path / "ckpt", config)
    out = export_checkpoint(ckpt, tmp_path / "awq", "awq")
    t = check_exported_integers(out, raw, "awq")
    assert torch.equal(t["model.layers.0.mlp.down_proj.weight"], source["model.layers.0.mlp.down_proj.weight"])
    qc = read_config(out)["quantization_config"]
    assert qc == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
                  "lm_head": False, "modules_to_not_convert": ["lm_head", "model.layers.0.mlp.down_proj"]}


def test_quantized_lm_head_sets_the_lm_head_flag():
    # vLLM quantizes its ParallelLMHead only when `lm_head` is true (both formats).
    from offline_tuner.export import awq_quantization_config, gptq_quantization_config

    spec = LayerQuantSpec(4, 32, True)
    _, _, _, packed = random_layer(64, 64, spec, 0)
    assert gptq_quantization_config({"lm_head": packed}, [], spec)["lm_head"] is True
    assert gptq_quantization_config({"model.layers.0.mlp.up_proj": packed}, ["lm_head"], spec)["lm_head"] is False
    assert awq_quantization_config({"lm_head": packed}, [], SignRoundConfig(spec, ()), "ckpt")["lm_head"] is True


@pytest.mark.parametrize("fmt,spec,expected", [
    ("gptq", LayerQuantSpec(3, -1, False), ["GPTQ in vLLM 0.32 holds symmetric 4- and 8-bit layers only",
                                             "3-bit asymmetric", "model.layers.0.mlp.down_proj",
                                             "serve them with the signround method"]),
    ("gptq", LayerQuantSpec(4, 32, False), ["4-bit asymmetric", "(14 layers)", "--format awq"]),
    ("awq", LayerQuantSpec(8, 32, True), ["AWQ in vLLM 0.32 holds 4-bit layers only", "8-bit symmetric",
                                          "--format gptq"]),
])
def test_checkpoint_refusals_name_format_setting_and_layers(tmp_path, fmt, spec, expected):
    ckpt, _, _ = make_checkpoint(tmp_path / "ckpt", SignRoundConfig(default=spec))
    with pytest.raises(ExportError) as e:
        export_checkpoint(ckpt, tmp_path / "out", fmt)
    for words in expected:
        assert words in str(e.value), (words, str(e.value))
    assert not (tmp_path / "out").exists()


def test_awq_refuses_per_layer_group_sizes(tmp_path):
    config = SignRoundConfig(default=LayerQuantSpec(4, 32, False),
                             layer_overrides={"model.layers.1.mlp.down_proj": LayerQuantSpec(4, -1, False)})
    ckpt, _, _ = make_checkpoint(tmp_path / "ckpt", config)
    with pytest.raises(ExportError) as e:
        export_checkpoint(ckpt, tmp_path / "out", "awq")
    text = str(e.value)
    assert "no per-layer settings" in text and "group_size=-1: model.layers.1.mlp.down_proj" in text
    assert "--format gptq" in text


def test_shards_of_a_fused_layer_must_agree(tmp_path):
    config = SignRoundConfig(default=LayerQuantSpec(4, 32, True),
                             layer_overrides={"model.layers.0.self_attn.k_proj": LayerQuantSpec(8, 32, True)})
    ckpt, _, _ = make_checkpoint(tmp_path / "ckpt", config)
    with pytest.raises(ExportError, match=r"fuses .* into model\.layers\.0\.self_attn\.qkv_proj.*k_proj: W8G32sym"):
        export_checkpoint(ckpt, tmp_path / "out", "gptq")
    config = SignRoundConfig(default=LayerQuantSpec(4, 32, False),
                             modules_to_not_convert=("model.layers.1.mlp.up_proj",))
    ckpt, _, _ = make_checkpoint(tmp_path / "ckpt2", config)
    with pytest.raises(ExportError, match=r"gate_up_proj.*up_proj: unquantized"):
        export_checkpoint(ckpt, tmp_path / "out", "awq")


def test_unknown_format_existing_output_and_overwrite(tmp_path):
    ckpt, _, _ = make_checkpoint(tmp_path / "ckpt", SignRoundConfig(default=LayerQuantSpec(4, 32, True)), layers=1)
    with pytest.raises(ExportError, match=r"'exl2' is not supported; choose one of \['compressed-tensors', 'gptq', 'awq'\]"):
        export_checkpoint(ckpt, tmp_path / "out", "exl2")
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_checkpoint(ckpt, tmp_path / "out", "gptq")
    export_checkpoint(ckpt, tmp_path / "out", "gptq", overwrite=True)
    assert read_config(tmp_path / "out")["quantization_config"]["quant_method"] == "gptq"


def test_cli_export_and_refusal(tmp_path, capsys):
    ckpt, _, _ = make_checkpoint(tmp_path / "ckpt", SignRoundConfig(default=LayerQuantSpec(4, 32, False)), layers=1)
    assert main(["export", str(ckpt), "--format", "awq", "--out", str(tmp_path / "awq")]) == 0
    assert read_config(tmp_path / "awq")["quantization_config"]["quant_method"] == "awq"
    assert main(["export", str(ckpt), "--format", "gptq", "--out", str(tmp_path / "gptq")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("signround: error: ") and "GPTQ in vLLM 0.32 holds symmetric 4- and 8-bit" in err
    assert main(["export", str(ckpt), "--format", "awq", "--out", str(tmp_path / "awq")]) == 2
    assert "already exists" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# Tier 2: vLLM's built-in gptq / awq methods serve the exported checkpoints (CPU, in-process)
# ----------------------------------------------------------------------------
def layer_methods(model) -> dict[str, tuple[str, str]]:
    """Linear layer name -> (vLLM quant method class, kernel class) inside the engine."""
    return {name: (type(m.quant_method).__name__, type(getattr(m.quant_method, "kernel", None)).__name__)
            for name, m in model.named_modules() if name.endswith("_proj") and getattr(m, "quant_method", None)}


def served_with_methods(path):
    from tests.test_vllm_plugin import MAX_TOKENS, PROMPTS
    from tests.vllm_utils import greedy_tokens_and_logprobs, run_on

    return run_on(path, lambda llm: (llm.apply_model(layer_methods)[0],
                                     greedy_tokens_and_logprobs(llm, PROMPTS, MAX_TOKENS)))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from offline_tuner.default_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0, num_layers=2, hidden=128,
                           intermediate=256, heads=4, kv_heads=2, vocab_size=512)


def assert_export_served_like_signround(model_dir, tmp_path, fmt: str, config: SignRoundConfig,
                                        method: tuple[str, str], unquantized: str) -> None:
    """Quantize, export as `fmt`, serve with vLLM's own method: every quantized layer uses `method`,
    `unquantized` stays dense, and the greedy tokens are those of the SignRound checkpoint."""
    from offline_tuner.quantize import quantize_checkpoint
    from tests.test_vllm_plugin import assert_same_greedy_as

    ckpt = tmp_path / "signround"
    quantize_checkpoint(model_dir, ckpt, config)
    out = export_checkpoint(ckpt, tmp_path / fmt, fmt)
    methods, served = served_with_methods(out)
    assert methods.pop(unquantized) == ("UnquantizedLinearMethod", "NoneType")
    assert set(methods.values()) == {method}, methods
    assert_same_greedy_as(out, ckpt, out=served)


@pytest.mark.slow
def test_gptq_export_served_by_vllm_gptq_matches_signround(tiny_model, tmp_path):
    config = SignRoundConfig(
        default=LayerQuantSpec(4, 32, True), modules_to_not_convert=("lm_head", "model.layers.1.mlp.down_proj"),
        layer_overrides={**{f"model.layers.0.self_attn.{p}_proj": LayerQuantSpec(4, 64, True) for p in "qkv"},
                         "model.layers.0.mlp.down_proj": LayerQuantSpec(4, -1, True)})
    assert_export_served_like_signround(tiny_model, tmp_path, "gptq", config,
                                        ("AutoGPTQLinearMethod", "CPUWNA16LinearKernel"), "model.layers.1.mlp.down_proj")


@pytest.mark.slow
def test_awq_export_served_by_vllm_awq_matches_signround(tiny_model, tmp_path):
    config = SignRoundConfig(
        default=LayerQuantSpec(4, 32, False), modules_to_not_convert=("lm_head", "model.layers.0.mlp.down_proj"),
        layer_overrides={"model.layers.0.self_attn.o_proj": LayerQuantSpec(4, 32, True),
                         **{f"model.layers.1.mlp.{p}_proj": LayerQuantSpec(4, 32, True) for p in ("gate", "up")}})
    assert_export_served_like_signround(tiny_model, tmp_path, "awq", config,
                                        ("AutoAWQMarlinLinearMethod", "CPUWNA16LinearKernel"), "model.layers.0.mlp.down_proj")


# ----------------------------------------------------------------------------
# compressed-tensors: exact layout, the package's own decompression, vLLM's own method
# ----------------------------------------------------------------------------
CT_PACKAGE = ROOT / ".cache" / "compressed-tensors-0.20"  # installed by ./run.sh setup, apart from vLLM's 0.17


def test_compressed_tensors_checkpoint_holds_every_setting_exactly(tmp_path):
    from tests.test_layouts import unpack_bit_streams

    config = SignRoundConfig(
        default=LayerQuantSpec(3, 32, False), modules_to_not_convert=("lm_head", "model.layers.1.mlp.down_proj"),
        layer_overrides={**{f"model.layers.0.self_attn.{p}_proj": LayerQuantSpec(2, 64, True) for p in "qkv"},
                         "model.layers.0.mlp.down_proj": LayerQuantSpec(8, -1, True),
                         "model.layers.1.self_attn.o_proj": LayerQuantSpec(4, 32, False)})
    ckpt, raw, _ = make_checkpoint(tmp_path / "ckpt", config)
    out = export_checkpoint(ckpt, tmp_path / "ct", "compressed-tensors")
    t = load_tensors(out)
    for name, (q, scales, zeros, spec) in raw.items():
        n, k = q.shape
        assert torch.equal(unpack_bit_streams(t[f"{name}.weight_packed"], spec.bits, k), q), name
        assert torch.equal(t[f"{name}.weight_scale"], scales), name
        assert t[f"{name}.weight_shape"].tolist() == [n, k]
        if zeros is None:
            assert f"{name}.weight_zero_point" not in t
        else:
            assert torch.equal(unpack_bit_streams(t[f"{name}.weight_zero_point"].t(), spec.bits, n).t(), zeros)
    qc = read_config(out)["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["ignore"] == ["lm_head", "model.layers.1.mlp.down_proj"]  # lm_head: never quantized by accident
    groups = {(g["weights"]["num_bits"], g["weights"]["group_size"], g["weights"]["symmetric"]): g["targets"]
              for g in qc["config_groups"].values()}
    assert groups[(3, 32, False)] == ["Linear"]
    assert groups[(8, None, True)] == [r"re:^model\.layers\.0\.mlp\.down_proj$"]
    assert len(groups[(2, 64, True)]) == 3 and len(groups) == 4


@pytest.mark.parametrize("spec", [LayerQuantSpec(2, 32, False), LayerQuantSpec(3, -1, True),
                                  LayerQuantSpec(4, 32, True), LayerQuantSpec(8, 32, False)],
                         ids=lambda s: s.short_name())
def test_compressed_tensors_package_decompresses_our_weights_bit_for_bit(tmp_path, spec):
    if not (CT_PACKAGE / "compressed_tensors").is_dir():
        pytest.fail(f"{CT_PACKAGE} is missing: run ./run.sh setup")
    config = SignRoundConfig(default=spec, modules_to_not_convert=("lm_head",),
                             layer_overrides={"model.layers.1.self_attn.o_proj": LayerQuantSpec(4, 64, False)})
    ckpt, raw, _ = make_checkpoint(tmp_path / "ckpt", config, seed=5)
    out = export_checkpoint(ckpt, tmp_path / "ct", "compressed-tensors")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(CT_PACKAGE), str(ROOT)]))
    found, _ = run_reporting_script([sys.executable, str(ROOT / "tests" / "ct_roundtrip.py"), str(out), str(ckpt)],
                                    ("ROUNDTRIP",), env, timeout=300)
    report = found["ROUNDTRIP"]
    assert tuple(int(v) for v in report["version"].split(".")[:2]) >= (0, 18), report["version"]
    assert set(report["layers"]) == set(raw)
    for name, layer in report["layers"].items():
        expected = config.spec_for(name)
        assert layer["equal"] and layer["dtype"] == "torch.float16", (name, layer)
        assert (layer["bits"], layer["symmetric"]) == (expected.bits, expected.sym), (name, layer)
        assert layer["group_size"] == (None if expected.group_size == -1 else expected.group_size), (name, layer)


@pytest.mark.slow
def test_compressed_tensors_export_served_by_vllm_matches_signround(tiny_model, tmp_path):
    config = SignRoundConfig(
        default=LayerQuantSpec(4, 32, False), modules_to_not_convert=("lm_head", "model.layers.1.mlp.down_proj"),
        layer_overrides={**{f"model.layers.0.self_attn.{p}_proj": LayerQuantSpec(4, 64, True) for p in "qkv"},
                         "model.layers.0.mlp.down_proj": LayerQuantSpec(4, -1, True)})
    assert_export_served_like_signround(tiny_model, tmp_path, "compressed-tensors", config,
                                        ("CompressedTensorsLinearMethod", "NoneType"), "model.layers.1.mlp.down_proj")


@pytest.mark.slow
def test_vllm_loads_2_3_and_8_bit_compressed_tensors_exports(tiny_model, tmp_path):
    """vLLM's own compressed-tensors loader takes the 2/3/8-bit tensors (a stand-in kernel replaces the
    CUDA-only ones): the served tokens are the SignRound checkpoint's."""
    from offline_tuner.quantize import quantize_checkpoint
    from tests.test_vllm_plugin import MAX_TOKENS, PROMPTS, assert_same_greedy_as

    config = SignRoundConfig(
        default=LayerQuantSpec(3, 32, False),
        layer_overrides={**{f"model.layers.0.self_attn.{p}_proj": LayerQuantSpec(2, 64, True) for p in "qkv"},
                         "model.layers.1.mlp.down_proj": LayerQuantSpec(8, -1, False)})
    ckpt = tmp_path / "signround"
    quantize_checkpoint(tiny_model, ckpt, config)
    out = export_checkpoint(ckpt, tmp_path / "ct", "compressed-tensors")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    found, _ = run_reporting_script([sys.executable, str(ROOT / "tests" / "ct_served_by_stub_kernel.py"), str(out),
                                     json.dumps(PROMPTS), str(MAX_TOKENS)], ("KERNELS", "TOKENS"), env, timeout=600)
    assert found["KERNELS"] == ["uint2b2", "uint3", "uint8"], found["KERNELS"]
    assert_same_greedy_as(out, ckpt, out=found["TOKENS"])
