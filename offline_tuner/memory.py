"""This process's memory, as the run log reports it.

Resident memory (RSS) counts memory-mapped weight files and page cache the process touched, which the
kernel can drop under pressure; anonymous memory (RssAnon) is what cannot be dropped. Targets are about
anonymous memory; both are reported.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


@dataclasses.dataclass
class MemoryPeak:
    """Peak anonymous memory over the samples taken, and the kernel's peak resident size."""

    peak_anon_bytes: int = 0

    def sample(self) -> None:
        anon = _status_kib("RssAnon")
        if anon is not None:
            self.peak_anon_bytes = max(self.peak_anon_bytes, anon * 1024)

    @staticmethod
    def peak_rss_bytes() -> int:
        hwm = _status_kib("VmHWM")
        if hwm is not None:
            return hwm * 1024
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def report(self) -> dict:
        self.sample()
        return {"peak_rss_bytes": self.peak_rss_bytes(), "peak_anon_bytes": self.peak_anon_bytes}


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None. Opened by its soname: ctypes.util.find_library would run ldconfig in a
    forked child after every block (a fork of a multi-GB process, counted twice by anyone measuring the tree)."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc: nothing to trim


def return_freed_memory() -> None:
    """Hand memory freed by the last block back to the system (glibc keeps freed heap pages otherwise,
    so the process would hold its largest block's transient peak for the rest of the run)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
