"""Compile the kernel ahead of time for an H100 (sm_90) without a GPU, and check its resources.

Every configuration the autotuner may choose (:func:`signround_triton.dequant_gemm.all_configs`)
is compiled for every bit width; group size (32: several groups per K tile, 128: one),
symmetry, activation dtype and K-tail masking are dealt round-robin so that each bit width
meets each of those combinations across the configurations (``--full``: the whole product).
A case fails when Triton cannot compile it or when it needs more shared memory than an
H100 block may have.

    python -m signround_triton.aot_check [--full] [--jobs N]

Needs TRITON_INTERPRET unset (the interpreter replaces the compiler). Prints one JSON
object per case and exits non-zero if any case failed.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

import triton

from signround_vllm.format import SUPPORTED_BITS
from signround_triton.dequant_gemm import GROUP_M, GemmConfig, all_configs, check_config, dequant_gemm_kernel

SM90_MAX_SHARED = 232448  # bytes of shared memory one block may use on an H100 (opt-in maximum)
AOT_GROUP_SIZES = (32, 128)


@dataclasses.dataclass(frozen=True)
class AotCase:
    config: GemmConfig
    bits: int
    group_size: int
    sym: bool
    dtype: str  # "fp16" or "bf16"
    even_k: bool = True
    has_bias: bool = False

    def label(self) -> str:
        return (f"W{self.bits}G{self.group_size}{'sym' if self.sym else 'asym'}-{self.dtype}"
                f"{'' if self.even_k else '-ktail'}{'-bias' if self.has_bias else ''} [{self.config}]")


def aot_cases(full: bool = False, configs: list[GemmConfig] | None = None) -> list[AotCase]:
    """The cases to compile: every config x every bit width, the rest round-robin (or all)."""
    configs = all_configs() if configs is None else configs
    combos = list(itertools.product(AOT_GROUP_SIZES, (False, True), ("bf16", "fp16")))
    cases = []
    for i, config in enumerate(configs):
        for b, bits in enumerate(SUPPORTED_BITS):
            if full:
                chosen = combos
            else:
                chosen = [combos[(i * len(SUPPORTED_BITS) + b) % len(combos)]]
            for group_size, sym, dtype in chosen:
                cases.append(AotCase(config, bits, group_size, sym, dtype, even_k=(i + b) % 2 == 0,
                                     has_bias=(i + b) % 3 == 0))
    return cases


def compile_ahead_of_time(case: AotCase, capability: int = 90):
    """Triton's CompiledKernel for `case` on a CUDA target (no GPU needed).

    The signature is that of a launch on contiguous tensors as the JIT would see it:
    unit strides specialized to 1, pointers and N, K, row strides 16-aligned.
    """
    config = case.config
    check_config(config, case.group_size)
    fn = dequant_gemm_kernel.fn
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset when "
                           "signround_triton.dequant_gemm is imported")
    act = case.dtype
    pointers = {"x_ptr": f"*{act}", "qweight_ptr": "*i32", "scales_ptr": "*fp16",
                "c_ptr": "*fp32" if config.split_k > 1 else f"*{act}"}
    if not case.sym:
        pointers["qzeros_ptr"] = "*u8"
    if case.has_bias:
        pointers["bias_ptr"] = f"*{act}"
    ints = ("M", "N", "K", "stride_xm", "stride_wk", "stride_sg", "stride_zg", "stride_cm")
    constexprs = dict(BITS=case.bits, GROUP_SIZE=case.group_size, SYM=case.sym, HAS_BIAS=case.has_bias,
                      DOT_FP32=False, GROUP_M=GROUP_M, EVEN_K=case.even_k, **config.meta())
    constexprs.update(stride_xk=1, stride_wn=1, stride_sn=1, stride_zn=1, stride_cn=1)
    if case.sym:
        constexprs.update(qzeros_ptr=None, stride_zg=0, stride_zn=0)
    if not case.has_bias:
        constexprs["bias_ptr"] = None
    return compile_for_cuda(fn, pointers, constexprs,
                            lambda name: (name != "M") if name in ints else None,  # any batch size M
                            config.num_warps, config.num_stages, capability)


def compile_for_cuda(fn, pointers: dict[str, str], constexprs: dict, int_aligned, num_warps: int, num_stages: int,
                     capability: int = 90):
    """Triton's CompiledKernel of the JIT function `fn` for a CUDA target, without a GPU.

    `constexprs` are specialized; `pointers` (name -> type such as "*fp16") are 16-byte aligned; every
    other argument is an i32, 16-aligned where `int_aligned(name)` is true (None: the argument has no
    ahead-of-time type, which is an error).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            aligned = int_aligned(name)
            if aligned is None:
                raise AssertionError(f"kernel argument {name} has no ahead-of-time type")
            signature[name] = "i32"
            if aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers and local memory (spills) per thread, from the cuobjdump inside Triton's wheel."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = {key: int(v) for key, v in re.findall(r"\b(REG|LOCAL|STACK):(\d+)", out)}
    return {"regs": found["REG"], "local_bytes": found["LOCAL"]} if "REG" in found else {}


def check_case(case: AotCase) -> dict:
    """Compile one case; returns a JSON-able record with ok, shared bytes and resources."""
    record = {"case": case.label()}
    try:
        compiled = compile_ahead_of_time(case)
    except Exception as e:  # noqa: BLE001 - reported, and the case fails
        record.update(ok=False, error=f"{type(e).__name__}: {str(e)[-2000:]}")
        return record
    shared = int(compiled.metadata.shared)
    record.update(shared=shared, **_resource_usage(compiled.asm["cubin"]))
    record["ok"] = shared <= SM90_MAX_SHARED
    if not record["ok"]:
        record["error"] = f"needs {shared} bytes of shared memory; an H100 block may have {SM90_MAX_SHARED}"
    return record


def run_cases(cases: list[AotCase], jobs: int) -> list[dict]:
    if jobs <= 1:
        return [check_case(c) for c in cases]
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(check_case, cases, chunksize=4))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="every group size x symmetry x dtype per config and bits")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot_check: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2
    records = run_cases(aot_cases(full=args.full), args.jobs)
    for r in records:
        print(json.dumps(r))
    failed = [r for r in records if not r["ok"]]
    print(f"# {len(records) - len(failed)}/{len(records)} cases compiled within {SM90_MAX_SHARED} bytes of "
          f"shared memory; max shared {max((r.get('shared', 0) for r in records), default=0)}, "
          f"max regs {max((r.get('regs', 0) for r in records), default=0)}, "
          f"cases with spills {sum(1 for r in records if r.get('local_bytes', 0) > 0)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
