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
