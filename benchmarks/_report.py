"""The one output format every nubis benchmark ends with (see the README, Benchmarks)."""

from __future__ import annotations

import json
import sys
from typing import Literal


def emit(
    bench: str,
    unit: str,
    nubis: float | None,
    reference: float,
    reference_name: str,
    better: Literal["lower", "higher"],
    **extra: object,
) -> dict[str, object]:
    """Print the benchmark's JSON line as the last line of output and return it.

    ``nubis`` is None when nubis could not be measured yet; the ratio is then None too.
    Extra keyword arguments add context fields (medians, sample counts, RSS, ...).
    """
    ratio = None if nubis is None or reference == 0 else nubis / reference
    record: dict[str, object] = {
        "bench": bench,
        "unit": unit,
        "nubis": nubis,
        "reference": reference,
        "reference_name": reference_name,
        "ratio": ratio,
        "better": better,
    }
    record.update(extra)
    sys.stdout.flush()
    print(json.dumps(record), flush=True)
    return record
