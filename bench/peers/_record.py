"""What every peer runner writes for one row: ``peer.json`` (settings, seconds, or the error: a
peer failing on CPU is a result, so the row is kept) and a one-line summary."""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path


def finish(out: Path, name: str, info: dict, t0: float, error: BaseException | None = None) -> None:
    info.setdefault("seconds", time.perf_counter() - t0)
    if error is not None:
        info["error"] = f"{type(error).__name__}: {error}"[:500]
        traceback.print_exc()
    (out / name).mkdir(parents=True, exist_ok=True)
    (out / name / "peer.json").write_text(json.dumps(info, indent=2))
    print(f"{name}: {info['seconds']:.1f}s {info.get('error', '')}", flush=True)
