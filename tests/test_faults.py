"""Injected faults: a loss that turns NaN or diverges, a process killed at random points.

Tier: end to end on a tiny random Llama. The killed runs use the real `signround` command in a
subprocess and SIGKILL (no chance to clean up), so they are marked slow.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import offline_tuner.signround as signround_core
from offline_tuner.default_model import make_tiny_model, prepare_default_model
from offline_tuner.quantize import Calibration, quantize_checkpoint
from offline_tuner.signround import TuneSettings
from offline_tuner.text_data import wikipedia_text
from signround_vllm.checkpoint import commit_folder, validate_checkpoint, write_file_atomically
from signround_vllm.format import LayerQuantSpec, SignRoundConfig

CONFIG = SignRoundConfig(default=LayerQuantSpec(3, 32, False))


@pytest.fixture(scope="module")
def tiny_and_text(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    model = make_tiny_model(root / "m", seed=4, num_layers=3, tokenizer_from=prepare_default_model())
    text = root / "calib.txt"
    text.write_text(wikipedia_text("calibration")[:80000])
    return model, text


def block_tensors(ckpt: Path, block: int) -> dict:
    return {k: v for k, v in load_file(str(ckpt / "model.safetensors")).items() if f"layers.{block}." in k}


@pytest.mark.parametrize("fault", ["nan", "diverge"])
def test_bad_loss_in_one_block_falls_back_to_rounding(tiny_and_text, tmp_path, monkeypatch, fault):
    """From iteration 3 of block 1 the tuned weights are poisoned (NaN, or blown up 50x). That block
    must keep round-to-nearest with a warning; the other blocks stay tuned; nothing non-finite is written."""
    model, text = tiny_and_text
    tune, calib = TuneSettings(iters=10, batch_size=2, seed=5), Calibration(6, 64, str(text))
    rtn = quantize_checkpoint(model, tmp_path / "rtn", CONFIG)  # round-to-nearest reference
    poisoned = {"on": False}
    real_quantized_weights = signround_core.quantized_weights

    def poisoning(weights, specs, tunables, *dtype):
        out = real_quantized_weights(weights, specs, tunables, *dtype)
        if poisoned["on"] and tunables is not None:
            out = {k: v * float("nan") if fault == "nan" else v * 50.0 for k, v in out.items()}
        return out

    def switch_on(event):
        if event.kind == "iteration":
            poisoned["on"] = poisoned["on"] or (event.data["block"] == 1 and event.data["iteration"] == 2)

    def log_and_switch_off(message):
        messages.append(message)
        if message.startswith("block 2/3"):  # block 1 is done, its final check included
            poisoned["on"] = False

    monkeypatch.setattr(signround_core, "quantized_weights", poisoning)
    messages = []
    result = quantize_checkpoint(model, tmp_path / "tuned", CONFIG, tune=tune, calibration=calib,
                                 progress=log_and_switch_off, events=switch_on)

    blocks = {b["block"]: b for b in result.run_log["blocks"]}
    assert blocks[1]["fell_back_to_rtn"] and not blocks[0]["fell_back_to_rtn"] and not blocks[2]["fell_back_to_rtn"]
    assert any("block 2/3" in m and "kept round-to-nearest" in m for m in messages), messages
    tensors = load_file(str(tmp_path / "tuned" / "model.safetensors"))
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())
    reference = block_tensors(rtn.out_dir, 1)
    assert reference and all(torch.equal(reference[k], v) for k, v in block_tensors(tmp_path / "tuned", 1).items())
    assert any(not torch.equal(block_tensors(rtn.out_dir, 0)[k], v)
               for k, v in block_tensors(tmp_path / "tuned", 0).items()), "block 0 was not tuned at all"
    validate_checkpoint(tmp_path / "tuned")


def test_replacing_a_folder_never_leaves_the_path_empty(tmp_path, monkeypatch):
    """--overwrite swaps the old checkpoint for the new one; if the swap fails, the old one stays."""
    old, new = tmp_path / "ckpt", tmp_path / ".ckpt.partial-1-x"
    for folder, text in ((old, "old"), (new, "new")):
        folder.mkdir()
        (folder / "f").write_text(text)
    commit_folder(new, old, overwrite=True)
    assert (old / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_file_written_atomically_is_the_old_or_the_new_one_never_a_part(tmp_path, monkeypatch):
    path = tmp_path / "state" / "run.json"
    write_file_atomically(path, "é old")
    assert path.read_text(encoding="utf-8") == "é old" and oct(path.stat().st_mode & 0o777) == "0o644"
    write_file_atomically(path, b"new")
    assert path.read_bytes() == b"new"

    def fail(*args):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_file_atomically(path, b"newer")
    assert path.read_bytes() == b"new" and [p.name for p in path.parent.iterdir()] == ["run.json"]


def quantize_cmd(model: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return [str(Path(sys.executable).with_name("signround")), "quantize", str(model), "--out", str(out),
            "--bits", "3", "--group-size", "32", "--iters", "60", "--n-samples", "8", "--seq-len", "64",
            "--batch-size", "2", "--seed", "7", "--calibration", str(text), "--max-shard-size", "100KB", *extra]


def run_until_killed(cmd: list[str], marker: str | None, delay_s: float, log: Path) -> bool:
    """Start cmd; SIGKILL it `delay_s` seconds after a line containing `marker` appears (after start if
    marker is None). True if it finished by itself first."""
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        if marker is not None:
            for line in proc.stdout:
                f.write(line)
                if marker in line:
                    break
        time.sleep(delay_s)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        f.write(proc.stdout.read())
        proc.wait()
        if proc.returncode == 0:
            return True
        assert proc.returncode == -signal.SIGKILL, f"exit code {proc.returncode}; log {log}"
        return False


@pytest.mark.slow
def test_runs_killed_at_random_points_resume_to_the_same_checkpoint(tiny_and_text, tmp_path):
    """SIGKILL a quantize run at seeded random moments in each phase (start-up, mid-tuning, while the
    checkpoint is packed and written), resuming each time. After every kill the output path holds
    nothing or a complete valid checkpoint; the final checkpoint is byte-identical to an uninterrupted
    run; no temporary folders are left behind."""
    model, text = tiny_and_text
    subprocess.run(quantize_cmd(model, text, tmp_path / "whole"), check=True, capture_output=True, timeout=600)
    out, log = tmp_path / "killed", tmp_path / "killed.log"
    rng = random.Random(20261123)
    state = out.parent / f".{out.name}.signround-work" / "state.json"

    def blocks_done():
        return json.loads(state.read_text())["done_blocks"] if state.exists() else 0

    def next_kill(phase):
        """(marker, delay) for a kill in `phase`, given where the resumable state is now."""
        if phase == "start-up":  # imports, model load, calibration, maybe the first block
            return None, rng.uniform(0.5, 3.0)
        if phase == "tuning":  # just after this run finished a block, while it tunes the next
            return "/3: loss", rng.uniform(0.0, 0.3)
        if blocks_done() < 3:  # packing and writing, right after the last block
            return "block 3/3:", rng.uniform(0.0, 0.02)
        return "resuming after block 3/3", rng.uniform(0.0, 0.05)  # replay, packing, writing

    kills = []
    for attempt, phase in enumerate(["start-up", "tuning", "writing"]):
        marker, delay = next_kill(phase)
        resume = ["--resume"] if attempt else []
        if run_until_killed(quantize_cmd(model, text, out, *resume), marker, delay, log):
            break
        kills.append(f"{phase}: {delay:.2f} s after {marker or 'start'} (blocks done: {blocks_done()})")
        if out.exists():  # killed after the rename: the result must be complete
            validate_checkpoint(out)
            break
    if not out.exists():
        subprocess.run(quantize_cmd(model, text, out, "--resume"), check=True, capture_output=True, timeout=600)
    print(f"\nkilled {', '.join(kills)}; then resumed")
    assert len(kills) >= 2, f"too few runs were killed before they ended: {kills}"
    validate_checkpoint(out)
    shards = sorted(p.name for p in (tmp_path / "whole").glob("model-*.safetensors"))
    assert len(shards) > 3 and shards == sorted(p.name for p in out.glob("model-*.safetensors"))
    for name in [*shards, "model.safetensors.index.json"]:  # byte-identical files, sharded output
        assert (tmp_path / "whole" / name).read_bytes() == (out / name).read_bytes(), name
    # A later write into the same folder removes what the killed writers left behind.
    quantize_checkpoint(model, out, CONFIG, overwrite=True)
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".killed"))
    assert not leftovers, leftovers
