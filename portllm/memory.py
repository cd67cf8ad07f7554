"""Process memory readings (Linux): resident set size and its peak, which can be reset."""

from __future__ import annotations


def rss(field: str = "VmRSS") -> int:
    """Bytes of ``field`` in /proc/self/status: VmRSS (now) or VmHWM (peak since the last reset)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (writes 5 to /proc/self/clear_refs); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
