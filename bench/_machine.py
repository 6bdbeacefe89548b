"""The host's CPU model, for the benchmarks' JSON (no heavy imports)."""
from __future__ import annotations


def cpu_model() -> str:
    """``model name`` from ``/proc/cpuinfo`` ("unknown" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
