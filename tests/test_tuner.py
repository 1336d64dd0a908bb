"""SignRound tuner: exact at zero iterations, better than rounding on real activations, resumable."""
import json

import pytest
import torch
from safetensors.torch import load_file

from signround_vllm.format import LayerQuantSpec, SignRoundConfig
from offline_tuner.architecture import find_decoder_blocks, record_block_calls
from offline_tuner.blockwise import WorkFolder, tune_blocks
from offline_tuner.streams import run_block_in_place
from offline_tuner.memory import MemoryPeak
from offline_tuner.model_source import open_model
from signround_vllm.shards import ShardedWriter
from offline_tuner.default_model import make_tiny_model, prepare_default_model
from offline_tuner.plan import resolve_plan
from offline_tuner.quantize import (Calibration, TunerInputError, fill_remaining, load_causal_lm, output_layout,
                                    quantize_checkpoint)
from offline_tuner.signround import TuneSettings, tune_block
from offline_tuner.text_data import token_windows, wikipedia_text


@pytest.fixture(scope="module")
def tiny_random(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", seed=1, vocab_size=512)


@pytest.mark.parametrize("spec", [LayerQuantSpec(2, 32, False), LayerQuantSpec(3, -1, True)], ids=str)
def test_zero_iterations_reproduce_round_to_nearest_exactly(tiny_random, tmp_path, spec):
    config = SignRoundConfig(default=spec)
    windows = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(0))
    rtn = quantize_checkpoint(tiny_random, tmp_path / "rtn", config).out_dir
    # The tuning stages with no iterations, on the meta-device model, block by block.
    source = open_model(tiny_random)
    model = source.empty_model()
    plan = resolve_plan(model, config, tuning=True)
    layout = output_layout(model, plan, source.dtype_of)
    work = WorkFolder(tmp_path / "tuned", {"test": 1}, resume=False)
    writer = ShardedWriter(work.path, layout)
    logs, _ = tune_blocks(model, source, windows, plan, TuneSettings(iters=0, batch_size=2), writer, work, MemoryPeak(),
                          torch.device("cpu"))
    fill_remaining(writer, source, model, plan)
    writer.finish()
    assert [log.block for log in logs] == [0, 1] and len(plan.layers) == 14
    a, b = load_file(str(rtn / "model.safetensors")), load_file(str(work.path / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_tuned_block_beats_rounding_on_real_activations():
    from transformers import AutoTokenizer

    path = prepare_default_model()
    model = load_causal_lm(path)
    windows = token_windows(AutoTokenizer.from_pretrained(path), wikipedia_text("calibration"), 8, 128, seed=0)
    calls = record_block_calls(model, find_decoder_blocks(model), windows, torch.device("cpu"))
    block = model.model.layers[0].float()
    x = calls.first_inputs
    run_block_in_place(block, x, calls.block_kwargs[0], 4)  # real activations entering block 1
    block = model.model.layers[1].float()
    kwargs = calls.block_kwargs[1]
    targets = x.clone()
    run_block_in_place(block, targets, kwargs, 4)
    linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    specs = {n: LayerQuantSpec(2, 32, False) for n in linears}
    before = {n: m.weight.detach().clone() for n, m in linears.items()}
    result = tune_block(block, linears, specs, x, targets, kwargs, TuneSettings(iters=30, batch_size=4), 0)
    assert result.final_tuned_loss < 0.8 * result.final_rtn_loss, result
    assert not result.fell_back_to_rtn
    for n, t in result.tunables.items():
        assert t.rounding_offset.abs().max() <= 0.5 and t.rounding_offset.abs().max() > 0
        for clip in (t.max_scale, t.min_scale):
            assert clip.min() >= 0 and clip.max() <= 1
        assert torch.equal(linears[n].weight, before[n])  # the block's own weights are untouched


class Interrupt(Exception):
    pass


@pytest.mark.slow
def test_two_block_model_tunes_serves_and_resumes_identically(tmp_path):
    from tests.test_vllm_plugin import assert_same_greedy_as
    from signround_vllm.checkpoint import write_dequantized_copy

    model_dir = make_tiny_model(tmp_path / "m", seed=2, tokenizer_from=prepare_default_model())
    text_file = tmp_path / "calib.txt"
    text_file.write_text(wikipedia_text("calibration")[:60000])
    config = SignRoundConfig(default=LayerQuantSpec(3, 32, False))
    tune, calib = TuneSettings(iters=8, batch_size=2, seed=3), Calibration(6, 64, str(text_file))

    whole = quantize_checkpoint(model_dir, tmp_path / "whole", config, tune=tune, calibration=calib)
    log = json.loads((tmp_path / "whole" / "signround_run.json").read_text())
    assert [b["block"] for b in log["blocks"]] == [0, 1]
    assert all(b["tuned_loss"] <= b["rtn_loss"] for b in log["blocks"])
    assert whole.run_log["tuner"]["method"] == "signround"

    def interrupt_in_block_1(block, it, iters, loss):
        if block == 1 and it == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        quantize_checkpoint(model_dir, tmp_path / "resumed", config, tune=tune, calibration=calib,
                            iteration_progress=interrupt_in_block_1)
    assert not (tmp_path / "resumed").exists()  # nothing half-written
    with pytest.raises(TunerInputError, match="other settings"):
        quantize_checkpoint(model_dir, tmp_path / "resumed", config, tune=TuneSettings(iters=9, batch_size=2, seed=3),
                            calibration=calib, resume=True)
    quantize_checkpoint(model_dir, tmp_path / "resumed", config, tune=tune, calibration=calib, resume=True)
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name

    assert_same_greedy_as(tmp_path / "whole", write_dequantized_copy(tmp_path / "whole", tmp_path / "deq"))


@pytest.fixture(scope="module")
def tiny_with_text(tmp_path_factory):
    root = tmp_path_factory.mktemp("streams")
    text = root / "calib.txt"
    text.write_text(wikipedia_text("calibration")[:30000])
    return make_tiny_model(root / "m", seed=6, num_layers=3, tokenizer_from=prepare_default_model()), text


def test_streams_on_disk_give_the_same_checkpoint_as_in_memory(tiny_with_text, tmp_path):
    model_dir, text = tiny_with_text
    config = SignRoundConfig(default=LayerQuantSpec(3, 32, False))
    tune, calib = TuneSettings(iters=3, batch_size=2, seed=2), Calibration(5, 48, str(text))
    in_memory = quantize_checkpoint(model_dir, tmp_path / "mem", config, tune=tune, calibration=calib)
    on_disk = quantize_checkpoint(model_dir, tmp_path / "disk", config, tune=tune, calibration=calib,
                                  stream_budget_bytes=0)
    assert "in memory" in in_memory.run_log["activation_streams"]
    assert "memory-mapped files" in on_disk.run_log["activation_streams"]
    assert (tmp_path / "mem" / "model.safetensors").read_bytes() == (tmp_path / "disk" / "model.safetensors").read_bytes()
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == sorted(p.name for p in (tmp_path / "mem").iterdir())
    assert not (tmp_path / ".disk.signround-work").exists()


def test_bf16_streams_tune_and_are_recorded(tiny_with_text, tmp_path):
    model_dir, text = tiny_with_text
    config = SignRoundConfig(default=LayerQuantSpec(3, 32, False))
    tune = TuneSettings(iters=3, batch_size=2, seed=2, stream_dtype="bfloat16")
    result = quantize_checkpoint(model_dir, tmp_path / "bf16", config, tune=tune,
                                 calibration=Calibration(5, 48, str(text)), stream_budget_bytes=0)
    assert "bfloat16" in result.run_log["activation_streams"] and result.run_log["settings"]["stream_dtype"] == "bfloat16"
    assert all(b["tuned_loss"] <= b["rtn_loss"] for b in result.run_log["blocks"])
    with pytest.raises(ValueError, match="stream_dtype='fp8'"):
        TuneSettings(stream_dtype="fp8")
