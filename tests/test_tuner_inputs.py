"""Bad tuner inputs get one actionable error; nothing is written."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from signround_vllm.format import LayerQuantSpec, SignRoundConfig, SignRoundFormatError, pack_linear
from offline_tuner.cli import main as cli_main
from offline_tuner.default_model import make_tiny_model
from offline_tuner.errors import TunerInputError
from offline_tuner.quantize import Calibration, quantize_checkpoint
from offline_tuner.signround import TuneSettings

CONFIG = SignRoundConfig(default=LayerQuantSpec(4, 32, False))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", seed=0, vocab_size=256)


def test_missing_model_path(tmp_path):
    with pytest.raises(TunerInputError, match="not a model folder"):
        quantize_checkpoint(tmp_path / "nope", tmp_path / "out", CONFIG)
    assert not (tmp_path / "out").exists()


def test_not_a_causal_lm(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 64}))
    with pytest.raises(TunerInputError, match="cannot be loaded as a causal language model"):
        quantize_checkpoint(tmp_path / "m", tmp_path / "out", CONFIG)
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(TunerInputError, match="weights cannot be read"):
        quantize_checkpoint(tmp_path / "m", tmp_path / "out", CONFIG)


def test_existing_output_is_refused_unless_overwrite(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        quantize_checkpoint(tiny, out, CONFIG)
    assert (out / "keep.txt").exists()
    quantize_checkpoint(tiny, out, CONFIG, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_nan_weights_are_refused(tiny, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(TunerInputError, match="model.layers.1.mlp.up_proj.weight contains NaN"):
        quantize_checkpoint(bad, tmp_path / "out", CONFIG)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.signround-work").exists()


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
    from offline_tuner.default_model import prepare_default_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_tok") / "m", seed=0, tokenizer_from=prepare_default_model())


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_model_without_tokenizer_cannot_calibrate(family, tmp_path):
    """For some families transformers builds an empty tokenizer from the config alone: refused all the same."""
    model = make_tiny_model(tmp_path / "m", seed=0, family=family, vocab_size=512)
    with pytest.raises(TunerInputError, match="no usable tokenizer for calibration"):
        quantize_checkpoint(model, tmp_path / "out", CONFIG, tune=TuneSettings(iters=2), calibration=Calibration(2, 8))


def test_calibration_too_short(tiny_with_tokenizer, tmp_path):
    tiny = tiny_with_tokenizer
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    with pytest.raises(TunerInputError, match=r"need 2048 tokens, but the text has \d+"):
        quantize_checkpoint(tiny, tmp_path / "out", CONFIG, tune=TuneSettings(iters=2),
                            calibration=Calibration(8, 256, str(short)))


def test_bad_calibration_file_types(tiny, tmp_path):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"txt": "no text field"}\n')
    with pytest.raises(ValueError, match='string field "text"'):
        quantize_checkpoint(tiny, tmp_path / "out", CONFIG, tune=TuneSettings(iters=2), calibration=Calibration(2, 8, str(bad)))
    csv = tmp_path / "c.csv"
    csv.write_text("a,b")
    with pytest.raises(ValueError, match="give a .txt or .jsonl file"):
        quantize_checkpoint(tiny, tmp_path / "out", CONFIG, tune=TuneSettings(iters=2), calibration=Calibration(2, 8, str(csv)))


def test_non_finite_scales_never_reach_a_checkpoint():
    with pytest.raises(SignRoundFormatError, match="NaN or Inf"):
        pack_linear(torch.zeros(4, 32, dtype=torch.int64), torch.full((4, 1), float("nan")), torch.zeros(4, 1),
                    LayerQuantSpec(4, 32, False))


def test_cli_prints_one_line_errors(tiny, tmp_path, capsys):
    assert cli_main(["quantize", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--iters", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("signround: error:") and "Traceback" not in err
    assert cli_main(["quantize", str(tiny), "--out", str(tmp_path / "o"), "--iters", "0",
                     "--layer-override", "model.layers.0.mlp.up_proj:bits=7"]) == 2
    assert "bits=7 is not supported" in capsys.readouterr().err


@pytest.mark.parametrize("device, words", [("gpu", "not a device"), ("cuda:3", "CUDA GPU"), ("meta", "cpu or cuda")])
def test_bad_device_is_refused_before_any_work(tiny, tmp_path, device, words):
    with pytest.raises(TunerInputError, match=words):
        quantize_checkpoint(tiny, tmp_path / "out", CONFIG, tune=TuneSettings(iters=1), device=device)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.signround-work").exists()
