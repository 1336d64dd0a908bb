"""Helpers for tests that run vLLM in-process on CPU."""
from __future__ import annotations

import gc
import json
import subprocess
from dataclasses import dataclass

TIE_TOLERANCE = 0.1  # nats: two tokens this close are a tie under bf16 rounding


def make_llm(path, **kwargs):
    from vllm import LLM

    args = dict(enforce_eager=True, dtype="bfloat16", max_model_len=256, skip_tokenizer_init=True, seed=0,
                enable_prefix_caching=False)
    args.update(kwargs)
    return LLM(str(path), **args)


def run_reporting_script(cmd: list[str], keys: tuple[str, ...], env: dict, timeout: float):
    """Run a script that prints `KEY=<json>` lines: ({key: value} for every key, the finished process).

    Fails with the end of its stderr unless it exits 0 having printed every key."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    found = {key: json.loads(line[len(key) + 1:]) for line in proc.stdout.splitlines()
             for key in keys if line.startswith(key + "=")}
    assert proc.returncode == 0 and len(found) == len(keys), proc.stderr[-4000:]
    return found, proc


def run_on(path, fn, **kwargs):
    """Start an engine for `path`, return fn(llm), and shut it down before returning.

    Only one engine may exist at a time in a process: the next one's parallel groups would be
    torn down when the previous engine is collected.
    """
    llm = make_llm(path, **kwargs)
    try:
        return fn(llm)
    finally:
        del llm
        gc.collect()


def greedy_tokens(llm, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    return [t for t, _ in greedy_tokens_and_logprobs(llm, prompts, max_tokens)]


def greedy_tokens_and_logprobs(llm, prompts: list[list[int]], max_tokens: int):
    """Per prompt: (greedy token ids, log-probability of each chosen token)."""
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=0),
                        use_tqdm=False)
    result = []
    for o in outs:
        ids = list(o.outputs[0].token_ids)
        result.append((ids, [d[t].logprob for t, d in zip(ids, o.outputs[0].logprobs)]))
    return result


def prompt_logprobs(llm, sequences: list[list[int]]) -> list[list[dict]]:
    """Per sequence, per position >= 1: {token_id: logprob} holding the actual token and the top-1."""
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": s} for s in sequences],
                        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    return [[{t: lp.logprob for t, lp in d.items()} for d in o.prompt_logprobs[1:]] for o in outs]


@dataclass
class Agreement:
    positions: int = 0
    exact: int = 0
    ties: int = 0
    worst_gap: float = 0.0
    max_logprob_diff: float = 0.0  # |candidate's logprob - reference's| of the chosen tokens


def check_greedy_agreement(candidate: list[list[int]], prompts: list[list[int]], reference_logprobs,
                           candidate_logprobs: list[list[float]] | None = None) -> Agreement:
    """Each token the candidate chose must be the reference's greedy choice, up to a near-tie.

    The reference scored prompt + candidate tokens (teacher forcing), so one divergence
    does not cascade. With candidate_logprobs, also the largest difference between the
    two models' log-probabilities of the chosen tokens.
    """
    a = Agreement()
    for row, (prompt, tokens, lps) in enumerate(zip(prompts, candidate, reference_logprobs)):
        for i, tok in enumerate(tokens):
            d = lps[len(prompt) - 1 + i]  # logprobs of the token at position len(prompt) + i
            best_tok = max(d, key=d.get)
            a.positions += 1
            if candidate_logprobs is not None:
                a.max_logprob_diff = max(a.max_logprob_diff, abs(candidate_logprobs[row][i] - d[tok]))
            if best_tok == tok:
                a.exact += 1
                continue
            gap = d[best_tok] - d[tok]
            a.worst_gap = max(a.worst_gap, gap)
            if gap <= TIE_TOLERANCE:
                a.ties += 1
    return a
