"""torch.compile for the tuning step, with eager PyTorch as the fallback.

Two pieces of each step are compiled: the fake quantization's weight-sized passes (offline_tuner.fake_quant)
and the block's forward with its loss (offline_tuner.signround). Compiling costs seconds per process, so
`TuneSettings.compile = "auto"` compiles only runs long enough to win it back (`compile_pays`). Where a
compile fails (no C++ compiler, an operation Inductor does not take) the step warns once and runs eager.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

COMPILE_CHOICES = ("auto", "on", "off")
# "auto" compiles when iterations x blocks x weights per block reach this. Measured on two cores (Xeon with
# AMX), SmolLM2-135M at the cpu-demo recipe (40 x 30 x 3.5M = 4.2e9): the compiled step saves ~1 s per block
# (2.8 against 3.8 s) for ~23 s of compiling with an empty Inductor cache (~6 s with a warm one), so a run
# breaks even near 3e9; the tests' tiny models (~1e7) would only pay the compile.
AUTO_COMPILE_WORK = 3e9


def compile_pays(iters: int, n_blocks: int, weights_per_block: int) -> bool:
    return iters * n_blocks * weights_per_block >= AUTO_COMPILE_WORK


class CompiledOrEager:
    """`fn` through torch.compile; after a failed compile, `fn` itself (one warning per process)."""

    def __init__(self, fn: Callable, **compile_kwargs):
        self.fn = fn
        self.compiled = torch.compile(fn, **compile_kwargs)
        self.failed = False

    def __call__(self, *args, **kwargs):
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - any compile failure: eager gives the same numbers
                self.failed = True
                first_line = str(e).splitlines()[0][:200] if str(e) else ""
                warnings.warn(f"torch.compile of {self.fn.__name__} failed ({type(e).__name__}: {first_line}); "
                              f"running it eagerly (--compile off skips the attempt)", RuntimeWarning, stacklevel=2)
        return self.fn(*args, **kwargs)
