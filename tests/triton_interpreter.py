"""What the Triton interpreter tests share: TRITON_INTERPRET=1 (without CUDA) around their imports and tests.

Triton decides interpreter or compiler when a function is *created* by ``@triton.jit``: for Triton's own
library functions (``tl.zeros``, ``tl.cdiv``, ...) when ``triton`` is first imported, for our kernels when
their module is imported; it reads ``TRITON_INTERPRET`` again while interpreted kernels run. So each such
test module sets the variable for its imports (re-importing kernel modules imported compiled before),
restores the environment for the modules collected after it, and sets it again around its own tests.
Nothing may import triton before them at collection (importing vLLM does): `require_interpreted_triton`
turns that into a collection error naming the cause, instead of hundreds of silently skipped tests.
"""
import os
from contextlib import contextmanager

import torch

CUDA = torch.cuda.is_available()


@contextmanager
def interpreter_env():
    previous = os.environ.get("TRITON_INTERPRET")
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def require_interpreted_triton() -> None:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not CUDA and not isinstance(tl.zeros, InterpretedFunction):
        raise RuntimeError("triton was imported before the Triton interpreter tests without TRITON_INTERPRET=1 "
                           "(a test module imports triton or vLLM at collection?), so its library functions "
                           "cannot run in the interpreter; move that import into the test, or set "
                           "TRITON_INTERPRET=1 for the whole session")


def check_close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "", *, tolerance) -> float:
    """Kernel output `y` against the fp32 reference: dtype, shape, no NaN/inf, and max |y - ref| within
    tolerance[dtype] of max |ref|. Returns that relative error."""
    assert y.dtype == dtype, f"{what}: output dtype {y.dtype}, expected {dtype}"
    assert y.shape == ref.shape, f"{what}: output shape {tuple(y.shape)}, expected {tuple(ref.shape)}"
    assert not torch.isnan(y).any(), f"{what}: NaN in the kernel output"
    assert not torch.isinf(y).any(), f"{what}: inf in the kernel output"
    scale = ref.abs().max().item()
    assert scale > 0, f"{what}: degenerate reference"
    err = (y.float() - ref).abs().max().item() / scale
    assert err <= tolerance[dtype], f"{what}: max error {err:.3e} of the output scale {scale:.3g} " \
                                    f"exceeds {tolerance[dtype]:.0e}"
    return err


def random_x(m: int, k: int, dtype, seed: int) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
