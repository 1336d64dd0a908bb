"""Bad checkpoints are refused with one clear error naming the file, tensor or layer (headers only)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from signround_vllm.checkpoint import validate_checkpoint
from signround_vllm.format import LayerQuantSpec, SignRoundConfig, SignRoundFormatError
from offline_tuner.default_model import make_tiny_model
from offline_tuner.quantize import quantize_checkpoint

LAYER = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    model = make_tiny_model(root / "m", seed=0, hidden=160, heads=5, kv_heads=5, intermediate=224, vocab_size=256)
    return quantize_checkpoint(model, root / "w4g32", SignRoundConfig(default=LayerQuantSpec(4, 32, False))).out_dir


@pytest.fixture
def ckpt(good_ckpt, tmp_path):
    return shutil.copytree(good_ckpt, tmp_path / "copy")


def edit_tensors(ckpt, fn):
    path = ckpt / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def edit_config(ckpt, **changes):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def refused(ckpt) -> str:
    with pytest.raises(SignRoundFormatError) as e:
        validate_checkpoint(ckpt)
    return str(e.value)


def test_good_checkpoint_passes(good_ckpt):
    config, layers = validate_checkpoint(good_ckpt)
    assert len(layers) == 14 and config.default == LayerQuantSpec(4, 32, False)


def test_truncated_file(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    msg = refused(ckpt)
    assert "model.safetensors" in msg and "not a complete safetensors file" in msg


def test_missing_tensor(ckpt):
    edit_tensors(ckpt, lambda t: t.pop(f"{LAYER}.qzeros"))
    assert f"missing tensors ['{LAYER}.qzeros']" in refused(ckpt)


def test_orphan_and_extra_tensors(ckpt, tmp_path):
    edit_tensors(ckpt, lambda t: t.update({"model.layers.0.mlp.other.scales": torch.zeros(1, 4, dtype=torch.float16)}))
    assert "have no matching .qweight" in refused(ckpt)
    other = shutil.copytree(ckpt.parent / "copy", tmp_path / "second")
    edit_tensors(other, lambda t: (t.pop("model.layers.0.mlp.other.scales"),
                                   t.update({f"{LAYER}.weight": torch.zeros(160, 224, dtype=torch.bfloat16)})))
    assert f"both a packed {LAYER}.qweight and a plain {LAYER}.weight" in refused(other)


def test_wrong_dtype(ckpt):
    edit_tensors(ckpt, lambda t: t.update({f"{LAYER}.scales": t[f"{LAYER}.scales"].float()}))
    msg = refused(ckpt)
    assert f"{LAYER}.scales: found torch.float32 (7, 160), expected torch.float16 (7, 160)" in msg


def test_config_disagrees_with_tensors(ckpt):
    edit_config(ckpt, bits=3)
    assert "for 3 bits expected [in_features * 3 // 32, out_features]" in refused(ckpt)
    edit_config(ckpt, bits=4, group_size=64)
    msg = refused(ckpt)
    assert "group_size=64 does not divide in_features=224" in msg and LAYER in msg
    edit_config(ckpt, group_size=32, sym=True)
    assert "unexpected" in refused(ckpt) and "qzeros" in refused(ckpt)


def test_unsupported_settings(ckpt):
    edit_config(ckpt, bits=5)
    msg = refused(ckpt)
    assert "config.json" in msg and "bits=5" in msg and "supported: [2, 3, 4, 8]" in msg
    edit_config(ckpt, bits=4, group_size=100)
    assert "group_size=100 is not supported" in refused(ckpt)


@pytest.mark.slow
def test_vllm_refuses_bad_checkpoint_before_serving(ckpt):
    from tests.vllm_utils import run_on

    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(Exception) as e:
        run_on(ckpt, lambda llm: None)
    assert "invalid SignRound checkpoint" in str(e.value) and "not a complete safetensors file" in str(e.value)


@pytest.mark.slow
def test_vllm_serve_prints_one_clear_error_without_traceback(ckpt):
    import subprocess
    import sys
    from pathlib import Path

    from signround_vllm.server import free_port

    edit_tensors(ckpt, lambda t: t.pop(f"{LAYER}.scales"))
    vllm = Path(sys.executable).with_name("vllm")
    done = subprocess.run([str(vllm), "serve", str(ckpt), "--quantization", "signround", "--host", "127.0.0.1",
                           "--port", str(free_port()), "--skip-tokenizer-init"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "ERROR: invalid SignRound checkpoint" in done.stderr and f"{LAYER}.scales" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]


from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 4000), flips=st.lists(st.tuples(st.integers(0, 3999), st.integers(1, 255)), max_size=4))
def test_fuzz_corrupted_bytes_are_refused_or_valid(good_ckpt, tmp_path, cut, flips):
    """Any corruption of the header region either still parses to a valid checkpoint or is refused
    with SignRoundFormatError; never another exception."""
    data = bytearray((good_ckpt / "model.safetensors").read_bytes())
    for pos, xor in flips:
        data[pos % len(data)] ^= xor
    if cut:
        data = data[: len(data) - cut]
    target = tmp_path / f"fuzz-{cut}-{len(flips)}"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    shutil.copy(good_ckpt / "config.json", target / "config.json")
    (target / "model.safetensors").write_bytes(bytes(data))
    try:
        validate_checkpoint(target)
    except SignRoundFormatError:
        pass
