"""Process memory readings (Linux): resident set size and its peak, which can be reset; and a job's
time and peak memory, measured in its own process (the experiment's costs, the port benchmark)."""

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


def measure(fn) -> dict:
    """Runs ``fn()`` once: its seconds, and the peak RSS above the RSS just before it
    (``peak_rss_above_baseline``; the peak is reset first, so it is this call's own)."""
    import time

    reset_peak_rss()
    base = rss("VmRSS")
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss_above_baseline": max(0, rss("VmHWM") - base), "baseline_rss": base}


def run_measured(argv: list[str], what: str, env: dict | None = None) -> dict:
    """Runs a measurement job in a process of its own (so that its peak memory is its own), with the
    environment ``env`` (default: this one's), and returns the JSON object of the last line it prints;
    RuntimeError naming ``what`` with its stderr if it fails."""
    import json
    import subprocess

    res = subprocess.run(argv, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"measurement {what} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])
