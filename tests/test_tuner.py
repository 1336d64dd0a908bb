"""SignRound tuner: exact at zero iterations, better than rounding on real activations, resumable."""
import json
import re

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
    layout = output_layout(model, plan, source)
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
    """Also with the step compiled (torch.compile): the same tuning up to floating-point order, which signed
    descent amplifies (8% apart on this block), so the compiled result is held to the same bar."""
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
    weights = {f"{n}.weight": m.weight for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    specs = {n: LayerQuantSpec(2, 32, False) for n in weights}
    before = {n: w.detach().clone() for n, w in weights.items()}
    result = tune_block(block, weights, specs, x, targets, kwargs, TuneSettings(iters=30, batch_size=4), 0)
    assert result.final_tuned_loss < 0.8 * result.final_rtn_loss, result
    compiled = tune_block(block, weights, specs, x, targets, kwargs,
                          TuneSettings(iters=30, batch_size=4, compile="on"), 0)
    assert compiled.final_rtn_loss == pytest.approx(result.final_rtn_loss, rel=1e-3)
    assert compiled.final_tuned_loss < 0.8 * compiled.final_rtn_loss, compiled
    assert compiled.final_tuned_loss == pytest.approx(result.final_tuned_loss, rel=0.2), (compiled, result)
    assert not result.fell_back_to_rtn
    for n, t in result.tunables.items():
        assert t.rounding_offset.abs().max() <= 0.5 and t.rounding_offset.abs().max() > 0
        for clip in (t.max_scale, t.min_scale):
            assert clip.min() >= 0 and clip.max() <= 1  # asymmetric layers never widen their range
        assert torch.equal(weights[n], before[n])  # the block's own weights are untouched


def test_tuned_clipping_factors_stay_in_their_bounds():
    """Signed steps keep asymmetric clipping factors in [0, 1] and let symmetric ones go above 1, up to
    SYM_CLIP_FACTOR_MAX: in rows whose extremes are +a and -0.99a (zeros otherwise), the 3-bit symmetric grid
    clips -0.99a to -0.75a, and widening the scale is what lowers the loss."""
    from offline_tuner.quant_core import SYM_CLIP_FACTOR_MAX

    gen = torch.Generator().manual_seed(0)
    w = torch.zeros(32, 2, 32)  # [rows, groups, group size]: one +1 and one -0.99 in each group
    first = torch.randint(0, 31, (32, 2), generator=gen)
    w.scatter_(2, first.unsqueeze(-1), 1.0)
    w.scatter_(2, first.unsqueeze(-1) + 1, -0.99)
    w = w.reshape(32, 64)
    block = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(32, 64, bias=False))
    with torch.no_grad():
        block[0].weight.copy_(w)
        block[1].weight.copy_(w.T.contiguous() * 0.5)
    x = torch.randn(8, 16, 64, generator=gen)
    with torch.no_grad():
        targets = block(x)
    weights = {f"{i}.weight": block[i].weight for i in range(2)}
    specs = {"0.weight": LayerQuantSpec(3, 32, True), "1.weight": LayerQuantSpec(3, 32, False)}
    settings = TuneSettings(iters=10, batch_size=4, bf16_autocast=False, clip_search="off")
    result = tune_block(block, weights, specs, x, targets, {}, settings, 0)
    sym, asym = result.tunables["0.weight"], result.tunables["1.weight"]
    for clip in (asym.max_scale, asym.min_scale):
        assert clip.min() >= 0 and clip.max() <= 1
    factors = torch.cat([sym.max_scale.flatten(), sym.min_scale.flatten()])
    assert factors.min() >= 0 and factors.max() <= SYM_CLIP_FACTOR_MAX
    assert factors.max() > 1, factors
    assert result.final_tuned_loss < result.final_rtn_loss


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

    def interrupt_in_block_1(event):
        if event.kind == "iteration" and event.data["block"] == 1 and event.data["iteration"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        quantize_checkpoint(model_dir, tmp_path / "resumed", config, tune=tune, calibration=calib,
                            events=interrupt_in_block_1)
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


def test_cli_log_json_has_one_event_per_line_and_no_bar_off_a_terminal(tiny_with_text, tmp_path, capsys):
    from offline_tuner.cli import main as cli_main

    model_dir, text = tiny_with_text
    events_file = tmp_path / "events.jsonl"
    code = cli_main(["quantize", str(model_dir), "--out", str(tmp_path / "ckpt"), "--bits", "4", "--group-size", "32",
                     "--iters", "4", "--n-samples", "4", "--seq-len", "32", "--batch-size", "2",
                     "--calibration", str(text), "--log-json", str(events_file)])
    assert code == 0
    records = [json.loads(line) for line in events_file.read_text().splitlines()]
    kinds = [r["event"] for r in records]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    assert kinds.count("iteration") == 3 * 4 and kinds.count("block_done") == 3
    done = [r for r in records if r["event"] == "block_done"]
    assert [r["block"] for r in done] == [0, 1, 2] and all(r["n_blocks"] == 3 for r in done)
    assert all(r["tuned_loss"] <= r["rtn_loss"] and r["seconds"] > 0 and r["peak_anon_bytes"] > 0 for r in done)
    assert records[-1]["out_dir"] == str(tmp_path / "ckpt") and records[-1]["peak_anon_bytes"] > 0
    assert all(isinstance(r["time"], float) for r in records)
    out = capsys.readouterr()
    assert "\r" not in out.err and "it/s" not in out.err  # no progress bar when stderr is not a terminal
    assert "iteration 4/4" in out.out  # plain log lines instead


def test_checkpoint_has_a_model_card_and_run_log(tiny_with_text, tmp_path):
    model_dir, text = tiny_with_text
    config = SignRoundConfig(default=LayerQuantSpec(4, 32, False),
                             layer_overrides={"model.layers.0.mlp.down_proj": LayerQuantSpec(8, 32, True)})
    out = quantize_checkpoint(model_dir, tmp_path / "ckpt", config, tune=TuneSettings(iters=2, batch_size=2),
                              calibration=Calibration(4, 32, str(text))).out_dir
    card = (out / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert f"base_model: {model_dir.name}" in front and "library_name: vllm" in front and "- signround" in front
    assert "W4G32asym: 20" in body and "W8G32sym: 1" in body  # 3 blocks x 7 layers, one overridden
    bits = re.search(r"bits per quantized weight \| ([0-9.]+)", body).group(1)
    assert 4.75 < float(bits) < 5.5  # 4 + 24/32 bits for most weights (scale, zero per group), one 8.5-bit layer
    assert "4 x 32 tokens" in body and "vllm serve" in body and "signround_run.json" in body
    assert json.loads((out / "signround_run.json").read_text())["blocks"]


def test_clipping_search_alone_clips_and_never_loses_to_rounding(tiny_with_text, tmp_path):
    """--iters 0 --clip-search: blocks go through the tuner for the search only; each block's loss is at
    most round-to-nearest's (a block where it is worse keeps round-to-nearest), and the integers differ."""
    model_dir, text = tiny_with_text
    config = SignRoundConfig(default=LayerQuantSpec(2, 32, False))
    calib = Calibration(4, 48, str(text))
    searched = quantize_checkpoint(model_dir, tmp_path / "search", config, calibration=calib,
                                   tune=TuneSettings(iters=0, batch_size=2, clip_search="on"))
    rtn = quantize_checkpoint(model_dir, tmp_path / "rtn", config)
    blocks = searched.run_log["blocks"]
    assert len(blocks) == 3 and all(b["tuned_loss"] <= b["rtn_loss"] for b in blocks)
    assert any(b["tuned_loss"] < b["rtn_loss"] for b in blocks)
    a, b = load_file(str(tmp_path / "search" / "model.safetensors")), load_file(str(rtn.out_dir / "model.safetensors"))
    assert any(not torch.equal(a[n], b[n]) for n in a if n.endswith(".scales"))


def test_default_step_is_halved_for_searched_layers_of_at_most_3_bits():
    """Both steps default to 1 / iters, half that for layers of at most 3 bits that start from the clipping
    search (chosen on the selection texts); --lr and --minmax-lr override them one at a time, for every layer."""
    settings = TuneSettings(iters=40)
    steps = {(b, sym): (settings.offset_lr(LayerQuantSpec(b, 32, sym)), settings.clip_lr(LayerQuantSpec(b, 32, sym)))
             for b, sym in [(2, False), (3, False), (4, False), (8, False), (3, True), (4, True)]}
    assert steps == {(2, False): (0.0125, 0.0125), (3, False): (0.025, 0.025), (4, False): (0.025, 0.025),
                     (8, False): (0.025, 0.025), (3, True): (0.0125, 0.0125), (4, True): (0.025, 0.025)}
    assert TuneSettings(iters=40, clip_search="off").offset_lr(LayerQuantSpec(2, 32, False)) == 0.025
    assert TuneSettings(iters=40, clip_search="on").offset_lr(LayerQuantSpec(3, 32, False)) == 0.0125
    given = TuneSettings(iters=40, lr=0.02, minmax_lr=0.03)
    assert [(given.offset_lr(LayerQuantSpec(b, 32, False)), given.clip_lr(LayerQuantSpec(b, 32, False)))
            for b in (2, 4)] == [(0.02, 0.03), (0.02, 0.03)]
    assert TuneSettings(iters=40, lr=0.02).clip_lr(LayerQuantSpec(2, 32, False)) == 0.0125


def test_clipping_search_by_default_for_the_chosen_bit_widths_when_tuning(tiny_with_text, tmp_path, monkeypatch):
    """clip_search "auto" (default): the asymmetric layers of 2 or 4 bits and the symmetric layers of 2 to 4
    bits of a tuned run start from the searched clipping, the others from 1.0; with no iterations nothing is
    searched; "on" / "off" search every layer / none."""
    import offline_tuner.signround as sr

    assert TuneSettings().clip_search == "auto"
    assert [TuneSettings(iters=i, clip_search=c).searches_clipping(LayerQuantSpec(b, 32, sym))
            for i, c, b, sym in [(5, "auto", 2, False), (5, "auto", 3, False), (5, "auto", 4, False), (5, "auto", 8, False),
                                 (5, "auto", 3, True), (5, "auto", 4, True), (5, "auto", 8, True), (0, "auto", 2, False),
                                 (0, "auto", 3, True), (0, "on", 4, False), (5, "off", 2, False), (5, "off", 3, True)]] == \
        [True, False, True, False, True, True, False, False, False, True, False, False]
    with pytest.raises(ValueError, match="clip_search='yes'"):
        TuneSettings(clip_search="yes")
    searched: list[int] = []
    original = sr.search_clipping

    def spy(w, spec, importance=None, **kw):
        searched.append(spec.bits)
        assert importance is not None and importance.shape == (w.shape[1],)  # the block's input energy
        return original(w, spec, importance, **kw)

    monkeypatch.setattr(sr, "search_clipping", spy)
    model_dir, text = tiny_with_text
    config = SignRoundConfig(default=LayerQuantSpec(3, 32, False),
                             layer_overrides={"model.layers.0.mlp.down_proj": LayerQuantSpec(2, 32, False)})
    quantize_checkpoint(model_dir, tmp_path / "mixed", config, calibration=Calibration(4, 32, str(text)),
                        tune=TuneSettings(iters=1, batch_size=2))
    assert searched == [2]  # one 2-bit layer in three blocks of seven
    quantize_checkpoint(model_dir, tmp_path / "every", config, calibration=Calibration(4, 32, str(text)),
                        tune=TuneSettings(iters=1, batch_size=2, clip_search="on"))
    assert len(searched) == 1 + 21


def test_held_back_windows_are_never_tuned_on(tiny_with_text, tmp_path, monkeypatch):
    """--holdout N: the tuning batches never contain the held-back windows, and the keep-or-fall-back judgement
    is made on exactly them; holding back every window is refused."""
    import offline_tuner.signround as sr

    model_dir, text = tiny_with_text
    seen: list[list[int]] = []
    original = sr.run_block

    def spy(block, x, kwargs, overrides=None):
        seen.append([round(float(v), 3) for v in x[:, :, 0].sum(-1)])  # one number per window
        return original(block, x, kwargs, overrides)

    monkeypatch.setattr(sr, "run_block", spy)
    config = SignRoundConfig(default=LayerQuantSpec(3, 32, False))
    calib = Calibration(6, 32, str(text))
    quantize_checkpoint(model_dir, tmp_path / "held", config, calibration=calib,
                        tune=TuneSettings(iters=4, batch_size=2, seed=3, holdout=2))
    per_block = 4 + 2  # 4 tuning batches, then round-to-nearest and the tuned weights on the held windows
    first_block = seen[:per_block]
    held = set(first_block[-1])
    assert len(held) == 2 and first_block[-2] == first_block[-1]
    assert not any(held & set(batch) for batch in first_block[:4])
    with pytest.raises(ValueError, match="holdout=6 leaves none"):
        quantize_checkpoint(model_dir, tmp_path / "none", config, calibration=calib,
                            tune=TuneSettings(iters=2, batch_size=2, holdout=6))


def test_token_normalized_loss_is_not_decided_by_one_huge_token():
    from offline_tuner.signround import block_loss

    target = torch.ones(1, 4, 8)
    target[0, 0] *= 1000.0  # an attention-sink-like token
    out = target.clone()
    out[0, 0] += 10.0  # 1% off on the huge token
    out[0, 1:] += 0.5  # 50% off on every ordinary token
    assert block_loss(out, target, "mse") == pytest.approx((100 * 8 + 0.25 * 24) / 32)
    assert block_loss(out, target, "token_normalized") == pytest.approx((1e-4 + 3 * 0.25 / (1 + 1e-6)) / 4, rel=1e-4)
    with pytest.raises(ValueError, match="loss='l1'"):
        TuneSettings(loss="l1")


def test_tied_lm_head_is_quantized_apart_from_the_embedding(tiny_with_text, tmp_path):
    """With lm_head not kept (modules_to_not_convert empty), a tuned run rounds lm_head to nearest (it lies
    outside the blocks), stores it apart from the tied input embedding, which stays as it was, and says so."""
    from signround_vllm.checkpoint import dequantized_state_dict
    from offline_tuner.allocation import Allocation
    from offline_tuner.quant_core import round_to_nearest_in_row_chunks

    model_dir, text = tiny_with_text
    spec = LayerQuantSpec(4, 32, False)
    config = SignRoundConfig(default=spec, modules_to_not_convert=())
    result = quantize_checkpoint(model_dir, tmp_path / "q", config, tune=TuneSettings(iters=2, batch_size=2),
                                 calibration=Calibration(4, 32, str(text)))
    assert result.run_log["rounded_to_nearest_outside_blocks"] == ["lm_head"]
    hf_config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert hf_config["tie_word_embeddings"] is False and hf_config["quantization_config"]["modules_to_not_convert"] == []
    stored = load_file(str(tmp_path / "q" / "model.safetensors"))
    embedding = load_file(str(model_dir / "model.safetensors"))["model.embed_tokens.weight"]
    assert "lm_head.weight" not in stored and torch.equal(stored["model.embed_tokens.weight"], embedding)
    q, scale, zero = round_to_nearest_in_row_chunks(embedding, spec)
    want = ((q.float() - zero.float().repeat_interleave(32, 1)) * scale.float().repeat_interleave(32, 1))
    got = dequantized_state_dict(tmp_path / "q", torch.float32)["lm_head.weight"]
    assert torch.allclose(got, want, atol=2e-3 * want.abs().max().item())  # scales are stored as float16
    with pytest.raises(TunerInputError, match="lm_head"):
        quantize_checkpoint(model_dir, tmp_path / "mixed", config, allocation=Allocation(3.5, n_windows=2, seq_len=32),
                            calibration=Calibration(text_file=str(text)))
    assert not (tmp_path / "mixed").exists()
