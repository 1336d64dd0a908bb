"""Tier 1: the quality benchmark's selection texts never share a token with the calibration windows."""
import importlib.util
from pathlib import Path

import torch

from offline_tuner.quantize import Calibration
from offline_tuner.text_data import token_windows

REPO = Path(__file__).resolve().parents[1]


def load_quality():
    spec = importlib.util.spec_from_file_location("quality_bench", REPO / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
