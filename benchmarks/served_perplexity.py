"""Perplexity of models as vLLM serves them: prompt log-probabilities of fixed token windows.

    python benchmarks/served_perplexity.py --windows W.pt --models CKPT [CKPT ...] --out R.json

`W.pt` holds {text name: LongTensor [windows, tokens]} (torch.save). Each model folder is served in
turn by an in-process vLLM engine (bf16, eager; a SignRound checkpoint through the plugin, found
from its `quantization_config`), one engine at a time. The result, {model: {"method": the
quantization method vLLM used or "bf16", "perplexity": {text: value}}}, is printed and written to
--out as each model finishes, so a failure keeps what came before.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def perplexity_of_engine(llm, windows: torch.Tensor) -> float:
    """exp(-mean log-probability) of every token after the first of each window, as the engine scores it."""
    from vllm import SamplingParams

    from offline_tuner.evaluation import perplexity_from_token_logprobs

    rows = windows.tolist()
    outs = llm.generate([{"prompt_token_ids": w} for w in rows],
                        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    logprobs = [[entry[token].logprob for token, entry in zip(w[1:], o.prompt_logprobs[1:])]
                for w, o in zip(rows, outs)]
    scored = sum(map(len, logprobs))
    if scored != windows.shape[0] * (windows.shape[1] - 1):
        raise RuntimeError(f"vLLM scored {scored} prompt tokens, expected {windows.shape[0] * (windows.shape[1] - 1)}")
    return perplexity_from_token_logprobs(logprobs)


def serve_and_score(model: Path, windows: dict[str, torch.Tensor]) -> dict:
    from vllm import LLM

    longest = max(w.shape[1] for w in windows.values())
    llm = LLM(str(model), dtype="bfloat16", enforce_eager=True, max_model_len=longest + 1, skip_tokenizer_init=True,
              enable_prefix_caching=False, seed=0)
    try:
        method = llm.llm_engine.model_config.quantization or "bf16"
        return {"method": method, "perplexity": {name: perplexity_of_engine(llm, w) for name, w in windows.items()}}
    finally:  # one engine at a time: the next one's parallel groups would be torn down with this one
        del llm
        gc.collect()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--windows", required=True, help="torch.save'd {text name: LongTensor [windows, tokens]}")
    p.add_argument("--models", nargs="+", required=True, help="model or checkpoint folders, served one after another")
    p.add_argument("--out", required=True, help="JSON file for the results")
    args = p.parse_args(argv)
    windows = torch.load(args.windows)
    if not isinstance(windows, dict) or not all(isinstance(w, torch.Tensor) and w.dim() == 2 for w in windows.values()):
        raise SystemExit(f"--windows {args.windows}: expected a dict of 2-D token tensors")
    results, out = {}, Path(args.out)
    for model in map(Path, args.models):
        if not (model / "config.json").is_file():
            raise SystemExit(f"--models {model}: not a model folder (no config.json)")
        results[str(model)] = serve_and_score(model, windows)
        print(json.dumps({str(model): results[str(model)]}), flush=True)
        out.write_text(json.dumps(results, indent=1))
    if not all(math.isfinite(v) for r in results.values() for v in r["perplexity"].values()):
        print("warning: a perplexity is not finite", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
