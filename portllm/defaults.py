"""Which backend each op uses when none is named: the one measured fastest on this kind of device.

The order per op and device class lives in ``portllm/_defaults_table.py``, generated from the
committed benchmark results (``benchmarks/results/*.json``) by::

    python tools/gen_defaults.py          # rewrites portllm/_defaults_table.py

A backend enters an order only if the results measured it faster than the reference on that class
of device in every case measured (ranked by the geometric mean of its time over the reference's);
the reference always closes the order, so a backend measured slower than it, or never measured, is
never a default. Only measurements of a kernel's current source count (``portllm.sources``): a
kernel edited since it was measured is no default until it is measured again, and
``measured_on_current_source`` says, per default, whether that holds here. ``tests/test_defaults.py``
checks the table against the results.

Device classes: ``cuda``; on CPUs, the vector path the C++ kernels take there (``cpu-avx512bf16``,
``cpu-avx512``, ``cpu-avx2``, ``cpu-generic``), which ``PORTLLM_CPU_ISA`` can force lower.
"""

from __future__ import annotations

import torch

from portllm import _ext
from portllm._defaults_table import SOURCES, TABLE


def device_class(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cpu":
        return f"cpu-{_ext.cpu_isa()}"
    return device.type


def order(op: str, device: torch.device | str) -> tuple[str, ...]:
    """Backends of ``op`` measured faster than the reference on this device class, fastest first,
    then the reference."""
    measured = TABLE.get(device_class(device), {}).get(op, ())
    return tuple(b for b in measured if b != "reference") + ("reference",)


def measured_on_current_source(op: str, device: torch.device | str) -> dict[str, bool | None]:
    """For each backend of ``op``'s default order on this device class: whether the source its
    measurement timed is the kernel's source here (None: this installation has no kernel source to
    compare, as an installed wheel has no ``csrc/``; the reference is not timed against itself)."""
    from portllm import sources

    made = SOURCES.get(device_class(device), {}).get(op, {})
    out: dict[str, bool | None] = {}
    for backend in order(op, device):
        if backend == "reference":
            continue
        now = sources.source_hash(op, backend)
        out[backend] = None if now is None else made.get(backend) == now
    return out
