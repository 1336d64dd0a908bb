"""What a long run reports, and the sinks that show it: library code emits, the CLI decides how to show.

Two kinds of report, defined once here:
- `Progress`: one human-readable line (`progress("calibration: 128 x 2048 tokens ...")`).
- `Event`: a structured record (`Event("block_done", {"block": 3, "rtn_loss": ..., "seconds": ...})`),
  for progress bars and for machine-readable run logs (`--log-json FILE`: one JSON object per line).

Event kinds emitted by the tuner: `run_started`, `iteration` (block, iteration, iters, loss),
`block_done` (block, n_blocks, rtn_loss, tuned_loss, best_iter, seconds, fell_back_to_rtn,
expert_tokens (mixture-of-experts blocks: tokens routed to each expert), peak_anon_bytes), `run_finished` (out_dir, seconds, layers, shards, peak memory).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Event:
    kind: str
    data: dict[str, Any]


EventSink = Callable[[Event], None]


def fan_out(*sinks: EventSink | None) -> EventSink | None:
    """One sink that hands each event to every given sink (None when there are none)."""
    live = [s for s in sinks if s is not None]
    if not live:
        return None
    if len(live) == 1:
        return live[0]

    def emit(event: Event) -> None:
        for sink in live:
            sink(event)

    return emit


class JsonLinesLog:
    """Writes each event as one JSON object per line, `{"time": ..., "event": kind, ...data}`, flushed."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def __call__(self, event: Event) -> None:
        record = {"time": round(time.time(), 3), "event": event.kind, **event.data}
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
