"""What every peer runner writes for one row: ``peer.json`` (settings, seconds, or the error: a
peer failing on CPU is a result, so the row is kept and the script goes on) and a one-line
summary."""

from __future__ import annotations

import contextlib
import json
import time
import traceback
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def peer_row(out: Path, name: str, info: dict) -> Iterator[float]:
    """Yields the start time; the body sets ``info["seconds"]`` where the peer's own work ends
    (otherwise the whole body is timed). An exception in the body is recorded, not raised."""
    t0 = time.perf_counter()
    try:
        yield t0
    except Exception as e:  # noqa: BLE001
        info["error"] = f"{type(e).__name__}: {e}"[:500]
        traceback.print_exc()
    info.setdefault("seconds", time.perf_counter() - t0)
    (out / name).mkdir(parents=True, exist_ok=True)
    (out / name / "peer.json").write_text(json.dumps(info, indent=2))
    print(f"{name}: {info['seconds']:.1f}s {info.get('error', '')}", flush=True)
