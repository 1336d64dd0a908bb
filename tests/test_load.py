"""Under load: `vllm serve --quantization signround` with the default model takes a bounded burst of
mixed requests (completions and chat, some streamed, a few cancelled midway) without a failure, stays
healthy, and answers each prompt under load exactly as it does alone (greedy), on one kernel at every batch size."""
import http.client
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from signround_vllm.format import LayerQuantSpec, SignRoundConfig
from signround_vllm.server import VllmServer
from offline_tuner.default_model import prepare_default_model
from offline_tuner.quantize import quantize_checkpoint
from offline_tuner.text_data import wikipedia_text

pytestmark = pytest.mark.slow

N_REQUESTS, CONCURRENCY, DEADLINE_S = 200, 16, 420
QUESTIONS = ["What is the capital of France?", "Name three colors.", "Explain photosynthesis in one sentence.",
             "Write a haiku about rain.", "What is 12 times 7?", "Who wrote Hamlet?"]


def make_requests(seed=0):
    """Distinct (kind, payload) pairs: chat questions and completions of Wikipedia excerpts of mixed length."""
    text = wikipedia_text("evaluation").split()
    rng = random.Random(seed)
    distinct = []
    for i, q in enumerate(QUESTIONS):
        distinct.append(("chat", {"messages": [{"role": "user", "content": q}], "max_tokens": 8 + 6 * i}))
    for i in range(14):
        start = rng.randrange(0, len(text) - 500)
        words = rng.choice([8, 40, 150, 400])
        distinct.append(("completion", {"prompt": " ".join(text[start:start + words]), "max_tokens": 4 + 4 * (i % 6)}))
    return distinct


# nats. Batched and unbatched bf16 arithmetic may flip a near-tie: bf16 logits of magnitude 16-32 are
# spaced 0.125-0.25 apart, and a gap of 0.125 between the top two tokens was seen to flip under load.
TIE_TOLERANCE = 0.25


def _positions(kind: str, choice: dict) -> list[tuple[str, dict]]:
    """(chosen token, {top token: logprob}) per generated position, from a choice or a stream chunk."""
    lp = choice.get("logprobs") or {}
    if kind == "chat":
        return [(c["token"], {t["token"]: t["logprob"] for t in c["top_logprobs"]} | {c["token"]: c["logprob"]})
                for c in lp.get("content") or []]
    return [(tok, dict(top or {}) | {tok: tlp})
            for tok, tlp, top in zip(lp.get("tokens") or [], lp.get("token_logprobs") or [], lp.get("top_logprobs") or [])]


def send(server: VllmServer, kind: str, payload: dict, stream: bool = False, cancel_after: int | None = None,
         timeout: float = 180.0):
    """One greedy request; returns [(token, top logprobs)] per generated position, or None if cancelled on
    purpose. Raises on any failure."""
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    # top-5: when the first two tie exactly, a third within tolerance may win under load (seen once)
    extra = {"logprobs": True, "top_logprobs": 5} if kind == "chat" else {"logprobs": 5}
    body = {"model": server.name, "temperature": 0, **payload, **extra, "stream": stream}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        if not stream:
            return _positions(kind, json.loads(resp.read())["choices"][0])
        positions, chunks = [], 0
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                return positions
            choices = json.loads(data)["choices"]
            if choices:
                positions += _positions(kind, choices[0])
            chunks += 1
            if cancel_after is not None and chunks >= cancel_after:
                return None  # close the connection midway: the server must abort the request cleanly
        raise RuntimeError("stream ended without [DONE]")
    finally:
        conn.close()


def compare(under_load, alone) -> str:
    """'same', 'tie' (diverged at a near-tie of the unloaded run), or a description of the difference."""
    tokens, ref = [t for t, _ in under_load], [t for t, _ in alone]
    if tokens == ref:
        return "same"
    i = next((j for j, (a, b) in enumerate(zip(tokens, ref)) if a != b), min(len(tokens), len(ref)))
    if i < min(len(tokens), len(ref)):
        top = alone[i][1]
        if tokens[i] in top and top[ref[i]] - top[tokens[i]] <= TIE_TOLERANCE:
            return "tie"
    top = alone[i][1] if i < len(alone) else {}
    return f"differs at token {i}: under load {tokens[i:i + 5]}, alone {ref[i:i + 5]} (alone's top: {top})"


@pytest.fixture(scope="module")
def served_default_model(tmp_path_factory):
    ckpt = quantize_checkpoint(prepare_default_model(), tmp_path_factory.mktemp("load") / "w4g64",
                               SignRoundConfig(default=LayerQuantSpec(4, 64, False))).out_dir
    # One kernel at every batch size. The default CPU choice on a CPU without AMX serves batches of up to 32 rows
    # with the int4-pack kernel (its bf16 scale table: within 1/16 of a quantization step, signround_vllm.cpu_int4)
    # and larger ones with exact tiles, so a prompt alone and the same prompt batched under load would run
    # different weights: on a 2-core Zen 4 one prompt's first token moved by 0.375 nats (2026-12-06). This test is
    # about batching, streaming and cancellation; the kernels' own accuracy is tested against the reference.
    env = {**os.environ, "SIGNROUND_KERNEL": "cpu_int4_exact"}
    with VllmServer(ckpt, extra_args=["--max-model-len", "1024", "--enforce-eager", "--max-num-seqs", "16"],
                    log_path=ckpt.parent / "serve.log", env=env) as server:
        yield server


def test_burst_of_mixed_requests(served_default_model):
    server = served_default_model
    distinct = make_requests()
    alone = [send(server, kind, payload) for kind, payload in distinct]
    assert all(alone) and all(len(a) == payload["max_tokens"] or a for a, (_, payload) in zip(alone, distinct))

    rng = random.Random(1)
    plan = []  # (index into distinct, stream, cancel_after)
    for i in range(N_REQUESTS):
        r = rng.random()
        plan.append((i % len(distinct), r < 0.3, 2 if r < 0.06 else None))
    rng.shuffle(plan)
    deadline = time.monotonic() + DEADLINE_S
    failures, mismatches, ties, cancelled, lock = [], [], [0], [0], threading.Lock()

    def run(item):
        idx, stream, cancel_after = item
        if time.monotonic() > deadline:
            raise TimeoutError("load test deadline passed before this request was sent")
        kind, payload = distinct[idx]
        try:
            out = send(server, kind, payload, stream=stream, cancel_after=cancel_after)
        except Exception as e:  # noqa: BLE001 - every failure is collected and reported
            with lock:
                failures.append(f"{kind} #{idx} stream={stream}: {type(e).__name__}: {e}")
            return
        with lock:
            verdict = "cancelled" if out is None else compare(out, alone[idx])
            if verdict == "cancelled":
                cancelled[0] += 1
            elif verdict == "tie":
                ties[0] += 1
            elif verdict != "same":
                mismatches.append(f"request #{idx} ({kind}, stream={stream}): {verdict}")

    t0 = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(run, plan))
    elapsed = time.monotonic() - t0
    print(f"load: {N_REQUESTS} requests, {CONCURRENCY} concurrent, {cancelled[0]} cancelled midway, "
          f"{len(failures)} failed, {ties[0]} diverged at a near-tie (<= {TIE_TOLERANCE} nats), "
          f"{len(mismatches)} differing otherwise, {elapsed:.1f} s")
    assert not failures, failures[:5]
    assert cancelled[0] > 0
    assert not mismatches, mismatches[:3]
    # How often batching flips a near-tie depends on the CPU's GEMMs: on a Xeon with AMX the dequantized bf16
    # model itself diverged at 50 of these 200 requests (this checkpoint at 59); on a Zen 4 far fewer.
    assert ties[0] <= N_REQUESTS * 2 // 5, f"{ties[0]} near-tie divergences: too many to be rounding"
    assert server.healthy()
    assert compare(send(server, *distinct[0]), alone[0]) in ("same", "tie")  # still serving after the burst
