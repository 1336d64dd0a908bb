"""Tier 1: the quality benchmark's selection texts never share a token with the calibration windows."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from offline_tuner.quantize import Calibration
from offline_tuner.text_data import token_windows

REPO = Path(__file__).resolve().parents[1]


def load_bench(script: str):
    """benchmarks/<script>.py as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"{script}_bench", REPO / "benchmarks" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_quality():
    return load_bench("quality")


class Identity:
    """A tokenizer whose token ids are the text's integers, so windows can be traced back to positions."""

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [int(t) for t in text.split()]}


def test_selection_windows_share_no_token_with_any_seeds_calibration_windows():
    quality = load_quality()
    ids = list(range(100_000))  # token id = position
    calib, seeds = Calibration(n_samples=40, seq_len=256), [42, 43]
    selection = quality.unused_windows(ids, calib, seeds, n=4, length=1024)
    assert selection.shape == (4, 1024)
    calibration = torch.cat([token_windows(Identity(), " ".join(map(str, ids)), calib.n_samples, calib.seq_len,
                                           seed=s).flatten() for s in seeds])
    assert not set(selection.flatten().tolist()) & set(calibration.tolist())
    assert len(set(selection.flatten().tolist())) == 4 * 1024  # four distinct spans
    for row in selection:  # each a contiguous span of the stream
        assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 1024))


def test_report_means_served_figures_over_seeds_for_every_tool():
    import argparse

    from benchmarks.benchlib import LoadWatch
    from offline_tuner.quantize import Calibration

    quality = load_quality()

    def served(ppl):
        return {"method": "signround", "perplexity": {"wiki": ppl}}

    def run(seconds):
        return {"seconds": seconds, "wall": seconds + 10, "peak_rss_bytes": 2**30, "tool": "x"}

    rows = [{"name": "W3G64asym", "seed": seed, "bits_per_weight": 3.375, "rtn": {"wiki": 50.0},
             "sr": {"wiki": 20.0 + seed - 42}, "gptq": {"wiki": 30.0}, "sr_run": run(100), "gptq_run": run(300),
             "served": {"rtn": served(51.0), "sr": served(21.0 + 2 * (seed - 42)), "gptq": served(32.0)}}
            for seed in (42, 43)]
    args = argparse.Namespace(seeds=[42, 43], eval_windows=4, eval_seq_len=1024, texts="evaluation")
    report = quality.render(args, [], {"wiki": 10.0}, served(11.0), rows, Calibration(32, 256), 40, 4,
                            LoadWatch(), 60)
    # served means: SignRound (21 + 23) / 2 = 22, GPTQ 32; gap closed (51 - 22) / (51 - 11) = 72%; 22 / 32 - 1
    assert "| W3G64asym | 3.375 | wiki | 11.00 | 51.00 | 22.00 | 32.00 | 72% | -31.2% |" in report
    assert "| W3G64asym | 43 | GPTQ | 3.375 | 32.00 |" in report
    assert "| W3G64asym | GPTQ | 300 s | 3.00 | 310 s | 2.82 | 1.00 GiB |" in report
    # the check line compares served with transformers figures: worst is GPTQ 32 vs 30
    assert "at most 10.00%" in report
    # a tool that chose its own settings (AutoScheme) is costed as this format stores them
    rows[1]["gptq_bits"] = quality.stored_bits([[2, 64, 100], [4, 32, 300]], sym=False)
    assert rows[1]["gptq_bits"] == (100 * (2 + 24 / 64) + 300 * (4 + 24 / 32)) / 400
    # layers that name their own kind (AutoScheme given both kinds): a symmetric one stores no zero point
    assert quality.stored_bits([[2, 64, 100, True], [4, 32, 300, False]], sym=False) == \
        (100 * (2 + 16 / 64) + 300 * (4 + 24 / 32)) / 400
    assert "| W3G64asym | 43 | GPTQ | 4.156 | 32.00 |" in quality.render(
        args, [], {"wiki": 10.0}, served(11.0), rows, Calibration(32, 256), 40, 4, LoadWatch(), 60)
    transformers_only = quality.render(args, [], {"wiki": 10.0}, None, rows, Calibration(32, 256), 40, 4,
                                       LoadWatch(), 60)
    assert "| W3G64asym | 3.375 | wiki | 10.00 | 50.00 | 20.50 | 30.00 | 74% | -31.7% |" in transformers_only


def test_resume_serves_again_only_the_tool_runs_redone(tmp_path, monkeypatch):
    """--resume reuses served perplexities by folder; a folder whose tool run was redone in this call
    (for example with other tuner options) must be measured again, the others not."""
    quality = load_quality()
    served_calls = []

    def fake_run_logged(cmd, log, timeout):
        models = cmd[cmd.index("--models") + 1:]
        served_calls.append(models)
        out = Path(cmd[cmd.index("--out") + 1])
        out.write_text(json.dumps({m: {"perplexity": {"wiki": float(len(served_calls))}} for m in models}))
        return 1.0

    monkeypatch.setattr(quality, "run_logged", fake_run_logged)
    models = {"rtn": tmp_path / "rtn", "sr": tmp_path / "sr", "gptq": tmp_path / "gptq"}
    first = quality.serve(models, tmp_path / "w.pt", "abc", tmp_path, "W3", 60, resume=True)
    assert served_calls == [[str(p) for p in models.values()]]
    again = quality.serve(models, tmp_path / "w.pt", "abc", tmp_path, "W3", 60, resume=True)
    assert again == first and len(served_calls) == 1
    redone = quality.serve(models, tmp_path / "w.pt", "abc", tmp_path, "W3", 60, resume=True,
                           remade={tmp_path / "sr"})
    assert served_calls[-1] == [str(tmp_path / "sr")]
    assert redone["sr"]["perplexity"]["wiki"] == 2.0 and redone["gptq"] == first["gptq"]
    assert quality.serve(models, tmp_path / "w.pt", "abc", tmp_path, "W3", 60, resume=True) == redone
    quality.serve(models, tmp_path / "w.pt", "abc", tmp_path, "W3", 60, resume=False)
    assert len(served_calls[-1]) == 3


def test_tuner_digest_follows_the_tuner_source_only(tmp_path, monkeypatch):
    """--resume keys SignRound runs on this digest: it changes with the tuner or the stored format, not with
    other code (the serving kernels)."""
    import shutil

    quality = load_quality()
    for entry in quality.TUNER_SOURCES + ("triton_kernels",):
        source = REPO / entry
        (tmp_path / entry).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / entry)
    monkeypatch.setattr(quality, "REPO", tmp_path)
    first = quality.tuner_digest()
    kernel = next((tmp_path / "triton_kernels").rglob("*.py"))
    kernel.write_text(kernel.read_text() + "\n# serving code\n")
    assert quality.tuner_digest() == first
    tuner = tmp_path / "offline_tuner" / "signround.py"
    tuner.write_text(tuner.read_text().replace('clip_search: str = "auto"', 'clip_search: str = "off"'))
    assert quality.tuner_digest() != first


def write_quality_report(folder: Path, name: str, date: str, command: str, runs: list[dict]) -> Path:
    (folder / f"{name}.md").write_text(f"# Quality\n\nMachine: x. Date: {date}; wall time 1 min.\nCommand: `{command}`\n")
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"runs": runs, "iters": 40, "batch_size": 4, "calibration": [32, 256]}))
    return path


def served_run(setting: str, seed: int, **tools: float) -> dict:
    """A run whose every tool has the same perplexity on each text."""
    return {"name": setting, "seed": seed,
            "served": {k: {"perplexity": {t: v for t in ("wiki", "news", "docs")}} for k, v in tools.items()}}


def test_summary_takes_the_newest_report_and_checks_each_target(tmp_path):
    summary = load_bench("quality_summary")
    cmd = "python benchmarks/quality.py --settings W3G32sym"
    old = write_quality_report(tmp_path, "old", "2026-12-01 10:00", cmd,
                               [served_run("W3G32sym", 42, rtn=60.0, sr=30.0, autoround=28.0, gptq=90.0)])
    new = write_quality_report(tmp_path, "new", "2026-12-02 10:00", cmd,
                               [served_run("W3G32sym", 42, rtn=60.0, sr=25.0, **{"autoround-ext": 24.0})])
    out = tmp_path / "summary.md"
    assert summary.main([str(new), str(old), "--out", str(out)]) == 0  # order given does not matter: dates do
    row = next(line for line in out.read_text().splitlines() if line.startswith("| W3G32sym | wiki |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:9] == ["60.00", "25.00", "28.00", "24.00", "-", "90.00", "-"]  # SignRound from the newer
    assert cells[9] == ("below RTN; 0.89x auto-round; NOT below alg-ext (+4.2%); below GPTQ/AWQ")
    # A mixed setting against SignRound's uniform settings of the same recipe that store at most its bits.
    mixed = write_quality_report(tmp_path, "mixed", "2026-12-02 11:00", "python benchmarks/quality.py",
                                 [served_run("mixed3.5", 42, rtn=40.0, sr=26.0, autoscheme=27.0),
                                  served_run("W3G64asym", 42, rtn=50.0, sr=27.0),
                                  served_run("W4G64asym", 42, rtn=22.0, sr=21.0)])
    assert summary.main([str(new), str(mixed), "--out", str(out)]) == 0
    row = next(line for line in out.read_text().splitlines() if line.startswith("| mixed3.5 | wiki |"))
    assert row.strip("|").split("|")[-1].strip() == "below RTN; at most AutoScheme; NOT below uniform W3G32sym"
    assert summary.targets("mixed3.5", "wiki", {"sr": 26.0}, {"W3G64asym": 27.0, "W4G64asym": 21.0}) == [
        "below every uniform setting of at most 3.5 bits (W3G64asym)"]
    ablation = write_quality_report(tmp_path, "abl", "2026-12-03 10:00", cmd + ' --signround-args="--iters 0"',
                                    [served_run("W3G32sym", 42, sr=1.0)])
    with pytest.raises(SystemExit, match="ablation"):
        summary.main([str(ablation)])


def load_tuning_speed():
    return load_bench("tuning_speed")


def test_tuning_speed_runs_a_trees_tuner_and_compares_each_round_with_its_own_autoround(tmp_path):
    import subprocess
    import sys
    from types import SimpleNamespace

    speed = load_tuning_speed()
    # A baseline tree's tuner is the one imported, not the venv's editable install of this checkout.
    (tmp_path / "offline_tuner").mkdir()
    (tmp_path / "offline_tuner" / "__init__.py").write_text("")
    where = subprocess.run([sys.executable, "-c", "import offline_tuner; print(offline_tuner.__file__)"],
                           cwd=tmp_path, env=speed.tree_env(tmp_path), capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).parent == tmp_path / "offline_tuner"
    assert speed.per_block_seconds({"blocks": [{"seconds": s} for s in (9.0, 3.0, 1.0, 2.0)]}) == (9.0, 2.0)

    def run(rnd, tuner, tool):
        return {"round": rnd, "tuner": tuner, "tool_seconds": tool, "wall": tool + 5, "peak_rss_bytes": 2**30,
                "first_block": None, "median_block": None}
    runs = [run(1, "SignRound abc", 50.0), run(1, "auto-round 0.16.1", 100.0),
            run(2, "auto-round 0.16.1", 200.0), run(2, "SignRound abc", 50.0)]
    args = SimpleNamespace(bits=3, group_size=64, sym=False, seed=42)
    report = speed.render(args, ["--rounds", "2"], runs, SimpleNamespace(n_samples=32, seq_len=256), 40, 4,
                          SimpleNamespace(describe=lambda: "load 1.0"))
    rows = [line for line in report.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert [r.split(" | ")[7] for r in rows] == ["0.50", "1.00", "1.00", "0.25"]


def test_matmul_floor_counts_every_unavoidable_matmul_of_a_block_and_skips_the_first_layers_input_gradients(tmp_path):
    from offline_tuner.default_model import make_tiny_model

    speed = load_tuning_speed()
    model_dir = make_tiny_model(tmp_path / "tiny", family="llama", num_layers=2)
    floor = speed.matmul_floor(model_dir, iters=3, batch=2, seq_len=16, repeats=1)
    assert floor["first_layers"] == ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"]
    assert (floor["blocks"], floor["steps"], floor["linear_layers"]) == (2, 6, 7)
    config = json.loads((model_dir / "config.json").read_text())
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * (h // config["num_attention_heads"])
    first, later = h * h + 2 * h * kv, h * h + 3 * h * i  # weights (N x K) of q, k, v and of o, gate, up, down
    tokens = 2 * 16
    assert floor["gflop_per_step"] == round((2 * tokens * (2 * (first + later) + later)) / 1e9, 2)
    assert floor["ms_per_step"] > 0 and floor["seconds"] == round(6 * floor["ms_per_step"] / 1000, 1)
    line = speed.floor_lines(floor, [{"tuner": "auto-round 0.16.1", "tool_seconds": 10.0}])[0]
    assert "input gradients of all but self_attn.k_proj, self_attn.q_proj, self_attn.v_proj" in line
    assert "Half of auto-round's tool time here: 5.0-5.0 s." in line


def test_step_profile_splits_a_profile_into_matmuls_attention_and_the_rest():
    from types import SimpleNamespace

    module = load_bench("step_profile")
    events = [SimpleNamespace(key=k, self_cpu_time_total=us) for k, us in [
        ("aten::mm", 40_000), ("aten::addmm", 4_000), (module.ATTENTION_FORWARD, 6_000),
        (module.ATTENTION_BACKWARD, 10_000), ("aten::mul", 3_000), ("## Call CompiledFxGraph abc", 1_000)]]
    assert module.split_profile(events, steps=2) == {"matmuls": 22.0, "attention forward": 3.0,
                                                     "attention backward": 5.0, "other": 2.0, "total": 32.0}
