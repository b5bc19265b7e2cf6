"""Peak-memory statistics: CUDA ``max_memory_allocated`` or process peak RSS on CPU."""

from __future__ import annotations

import os
import sys

import torch


def _peak_rss_bytes() -> int:
    try:
        import resource  # noqa: PLC0415 (POSIX only)

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss) if sys.platform == "darwin" else int(rss) * 1024  # Linux reports KiB
    except (ImportError, OSError):  # pragma: no cover - non-POSIX
        return 0


def _current_rss_bytes() -> int:
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return _peak_rss_bytes()


def memory_stats(device: torch.device | str) -> dict[str, float]:
    """Memory in GiB: ``peak_mem_gib`` (peak allocated on CUDA, peak process RSS on CPU) and current.

    On CUDA the peak is per-interval: call :func:`reset_peak_memory` after logging to get per-step peaks.
    """
    device = torch.device(device)
    gib = 1024**3
    if device.type == "cuda" and torch.cuda.is_available():
        return {
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / gib,
            "mem_reserved_gib": torch.cuda.memory_reserved(device) / gib,
        }
    return {"peak_mem_gib": _peak_rss_bytes() / gib, "rss_gib": _current_rss_bytes() / gib}


def reset_peak_memory(device: torch.device | str) -> None:
    """Resets the CUDA peak counter (no-op on CPU, where peak RSS cannot be reset)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)
