"""Start `vllm serve` on 127.0.0.1 and talk to it over the OpenAI-compatible API (stdlib only)."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Sequence


class ServerError(RuntimeError):
    """vllm serve did not start, or a request to it failed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_executable() -> str:
    exe = Path(sys.executable).with_name("vllm")
    if exe.exists():
        return str(exe)
    found = shutil.which("vllm")
    if not found:
        raise ServerError("the `vllm` command is not installed in this environment (run ./run.sh setup)")
    return found


def stop_process_group(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGINT to the process group of proc (started with start_new_session=True); SIGKILL after timeout."""
    for sig in (signal.SIGINT, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout if sig == signal.SIGINT else None)
            return
        except subprocess.TimeoutExpired:
            continue


class VllmServer:
    """`with VllmServer(model_dir, ...) as server:` starts, waits until healthy, and always stops."""

    def __init__(self, model: str | os.PathLike, *, quantization: str | None = "signround",
                 extra_args: Sequence[str] = (), log_path: str | os.PathLike | None = None,
                 startup_timeout: float = 420.0, progress: Callable[[str], None] | None = None,
                 served_name: str | None = None, env: dict | None = None):
        self.model = str(model)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.name = served_name or Path(self.model).name
        self.quantization = quantization
        self.extra_args = list(extra_args)
        self.log_path = Path(log_path) if log_path else Path(self.model).parent / f"vllm-serve-{self.port}.log"
        self.startup_timeout = startup_timeout
        self.progress = progress
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    def command(self) -> list[str]:
        cmd = [vllm_executable(), "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port),
               "--served-model-name", self.name]
        if self.quantization:
            cmd += ["--quantization", self.quantization]
        return cmd + self.extra_args

    def __enter__(self) -> "VllmServer":
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("VLLM_HOST_IP", "127.0.0.1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        log.close()
        next_note = 15.0
        while True:
            elapsed = time.perf_counter() - t0
            if self.proc.poll() is not None:
                raise ServerError(f"vllm serve exited with code {self.proc.returncode} while starting; "
                                  f"last lines of {self.log_path}:\n{self.log_tail()}")
            if elapsed > self.startup_timeout:
                self.stop()
                raise ServerError(f"vllm serve was not healthy after {self.startup_timeout:.0f} s; "
                                  f"last lines of {self.log_path}:\n{self.log_tail()}")
            if self.healthy():
                self.startup_seconds = elapsed
                return self
            if self.progress and elapsed >= next_note:
                self.progress(f"waiting for vllm serve to become healthy ({elapsed:.0f} s; log: {self.log_path})")
                next_note += 15.0
            time.sleep(1.0)

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def post(self, path: str, payload: dict, timeout: float = 300.0) -> dict:
        req = urllib.request.Request(self.base_url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise ServerError(f"POST {path} failed with HTTP {e.code}: {e.read()[:2000]!r}") from None

    def chat(self, message: str, max_tokens: int = 64) -> str:
        out = self.post("/v1/chat/completions", {
            "model": self.name, "messages": [{"role": "user", "content": message}],
            "max_tokens": max_tokens, "temperature": 0})
        return out["choices"][0]["message"]["content"]

    def complete(self, prompt: str, max_tokens: int = 48) -> str:
        out = self.post("/v1/completions", {"model": self.name, "prompt": prompt, "max_tokens": max_tokens,
                                            "temperature": 0})
        return out["choices"][0]["text"]

    def prompt_token_logprobs(self, token_ids: Sequence[int]) -> list[float]:
        """Log-probability of each token of `token_ids` after the first, as scored by the server."""
        out = self.post("/v1/completions", {"model": self.name, "prompt": list(map(int, token_ids)),
                                            "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0})
        entries = out["choices"][0]["prompt_logprobs"]
        logprobs = []
        for tok, entry in zip(token_ids[1:], entries[1:]):
            logprobs.append(float(entry[str(int(tok))]["logprob"]))
        return logprobs


def perplexity_from_logprobs(logprobs: Sequence[float | None]) -> float:
    """exp(-mean log-probability); ``None`` entries (vLLM's first prompt token) are skipped."""
    values = [lp for lp in logprobs if lp is not None]
    if not values:
        raise ValueError("no log-probabilities given: perplexity is undefined")
    return math.exp(-math.fsum(values) / len(values))
