"""Every dense decoder family: blocks found and replayed as the model runs them, tuned, served right.

Tier 1 (fast): the tuner's replay of the blocks, each with the arguments the model's own forward
gave it, reproduces the model's final hidden states exactly; on Gemma 2/3 (sliding-window and global
layers alternate, with their own rotary settings) reusing block 0's arguments does not, so the test
models make the difference visible. Refusals of what cannot be quantized yet.
Tier 3 (slow): each family quantized (round-to-nearest, and SignRound with a few iterations) and
served by vLLM through the plugin gives the greedy tokens and log-probabilities of its own
dequantized weights loaded as a plain bf16 model.
"""
import json

import pytest
import torch

from offline_tuner.architecture import find_decoder_blocks, record_block_calls
from offline_tuner.streams import run_block_in_place
from offline_tuner.default_model import MOE_FAMILIES, TINY_FAMILIES, make_tiny_model, prepare_default_model
from offline_tuner.errors import TunerInputError
from offline_tuner.plan import resolve_plan
from offline_tuner.quantize import Calibration, load_causal_lm, quantize_checkpoint
from offline_tuner.signround import TuneSettings
from signround_vllm.format import LayerQuantSpec, SignRoundConfig

FAMILIES = sorted(TINY_FAMILIES)
DENSE_FAMILIES = [f for f in FAMILIES if f not in MOE_FAMILIES]  # mixture-of-experts ones: tests/test_moe.py
SEQ = 40  # longer than the Gemma test models' sliding window (16)


def _windows(n=3, vocab=512):
    return torch.randint(0, vocab, (n, SEQ), generator=torch.Generator().manual_seed(0))


def _replay(blocks, calls, kwargs_of):
    x = calls.first_inputs.clone()
    for i, block in enumerate(blocks.blocks):
        assert run_block_in_place(block, x, kwargs_of(i), 2)
    return x


@pytest.mark.parametrize("family", FAMILIES)
def test_replaying_blocks_with_their_recorded_arguments_reproduces_the_model(family, tmp_path):
    model = load_causal_lm(make_tiny_model(tmp_path / family, seed=0, num_layers=4, family=family,
                                           vocab_size=512)).float()
    blocks = find_decoder_blocks(model)
    assert len(blocks) == 4 and blocks.path == "model.layers"
    windows = _windows()
    calls = record_block_calls(model, blocks, windows, torch.device("cpu"))
    assert calls.first_inputs.shape == (3, SEQ, 128)
    with torch.no_grad():
        expected = model(input_ids=windows, output_hidden_states=True).hidden_states[-1]  # after the final norm
    final_norm = model.get_decoder().norm
    replayed = final_norm(_replay(blocks, calls, lambda i: calls.block_kwargs[i]))
    torch.testing.assert_close(replayed, expected, rtol=1e-5, atol=1e-5)
    if family in ("gemma2", "gemma3"):  # block 0's arguments are wrong for the global layers
        wrong = final_norm(_replay(blocks, calls, lambda i: calls.block_kwargs[0]))
        assert (wrong - expected).abs().max() > 0.1


def test_blocks_are_recorded_without_running_them(tmp_path):
    model = load_causal_lm(make_tiny_model(tmp_path / "m", seed=0, num_layers=3, vocab_size=512))
    blocks = find_decoder_blocks(model)
    ran = []
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, b in enumerate(blocks.blocks)]
    record_block_calls(model, blocks, _windows(2), torch.device("cpu"))
    for h in handles:
        h.remove()
    assert ran == [] and all(type(b).__name__ == "LlamaDecoderLayer" for b in blocks.blocks)


def test_model_without_declared_blocks_is_refused_for_tuning_only(tmp_path):
    model = load_causal_lm(make_tiny_model(tmp_path / "m", seed=0, vocab_size=512))
    model._no_split_modules = []
    config = SignRoundConfig(default=LayerQuantSpec(4, 32, False))
    assert len(resolve_plan(model, config, tuning=False).layers) == 14  # round-to-nearest needs no blocks
    with pytest.raises(TunerInputError, match="cannot tell which modules are its decoder blocks"):
        resolve_plan(model, config, tuning=True)


def test_weights_that_are_not_linear_layers_are_refused_up_front(tmp_path):
    """A 3-D expert weight that the files store whole, not one weight per expert (as vLLM's expert
    loaders read them), is refused rather than left in bf16 unseen."""
    model = load_causal_lm(make_tiny_model(tmp_path / "m", seed=0, vocab_size=512))

    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.zeros(4, 64, 128))

    model.model.layers[1].mlp.experts = Experts()
    config = SignRoundConfig(default=LayerQuantSpec(4, 32, False))
    with pytest.raises(TunerInputError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj \(Experts, shape "
                                              r"\[4, 64, 128\]\) is stored as .*not as one weight per expert"):
        resolve_plan(model, config, tuning=False)
    kept = SignRoundConfig(default=LayerQuantSpec(4, 32, False), modules_to_not_convert=("lm_head", "experts"))
    assert len(resolve_plan(model, kept, tuning=True).layers) == 14


def test_override_of_an_unknown_layer_is_refused(tmp_path):
    model = load_causal_lm(make_tiny_model(tmp_path / "m", seed=0, vocab_size=512))
    config = SignRoundConfig(default=LayerQuantSpec(4, 32, False),
                             layer_overrides={"model.layers.7.mlp.down_proj": LayerQuantSpec(8, 32, False)})
    with pytest.raises(TunerInputError, match=r"model\.layers\.7\.mlp\.down_proj"):
        resolve_plan(model, config, tuning=False)


def test_quantized_lm_head_is_refused_where_vllm_has_none(tmp_path):
    """vLLM's Gemma 2 computes logits from the input embedding: a quantized lm_head could not be loaded."""
    model = load_causal_lm(make_tiny_model(tmp_path / "m", seed=0, vocab_size=512, family="gemma2"))
    config = SignRoundConfig(default=LayerQuantSpec(4, 32, False), modules_to_not_convert=())
    with pytest.raises(TunerInputError, match=r"lm_head of Gemma2ForCausalLM"):
        resolve_plan(model, config, tuning=False)
    kept = SignRoundConfig(default=LayerQuantSpec(4, 32, False), modules_to_not_convert=("lm_head",))
    assert "lm_head" not in resolve_plan(model, kept, tuning=False).layers


@pytest.mark.slow
@pytest.mark.parametrize("family", DENSE_FAMILIES)
def test_family_tunes_and_serves_its_dequantized_weights(family, tmp_path, calibration_text):
    from signround_vllm.checkpoint import write_dequantized_copy
    from tests.test_vllm_plugin import assert_same_greedy_as

    model_dir = make_tiny_model(tmp_path / "m", seed=5, num_layers=4, family=family,
                                tokenizer_from=prepare_default_model())
    config = SignRoundConfig(default=LayerQuantSpec(4, 32, False))
    for method, tune in (("rtn", None), ("signround", TuneSettings(iters=4, batch_size=2, seed=1))):
        ckpt = tmp_path / f"ckpt-{method}"
        quantize_checkpoint(model_dir, ckpt, config, tune=tune, calibration=Calibration(4, SEQ, str(calibration_text)))
        run_log = json.loads((ckpt / "signround_run.json").read_text())
        assert run_log["tuner"]["method"] == method
        if tune is not None:
            assert [b["block"] for b in run_log["blocks"]] == [0, 1, 2, 3]
        assert_same_greedy_as(ckpt, write_dequantized_copy(ckpt, tmp_path / f"deq-{method}"))


def test_matrix_that_is_neither_a_linear_layer_nor_experts_is_refused(tmp_path):
    model = load_causal_lm(make_tiny_model(tmp_path / "m", seed=0, vocab_size=512))
    model.model.layers[0].mlp.register_parameter("extra", torch.nn.Parameter(torch.zeros(8, 128)))
    with pytest.raises(TunerInputError, match=r"model\.layers\.0\.mlp\.extra \(LlamaMLP, shape \[8, 128\]\)"):
        resolve_plan(model, SignRoundConfig(default=LayerQuantSpec(4, 32, False)), tuning=False)
