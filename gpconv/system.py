"""Facts about the machine a number was measured on: CPU, allocator, load, library versions.

Benchmarks and recipe results store :func:`machine_info` next to what they measured.
"""

from __future__ import annotations

import os
import platform

import torch


def cpu_field(key: str) -> str | None:
    """The first value of ``key`` in /proc/cpuinfo ("model name", "vendor_id"), or None where there
    is none (not Linux, not that field)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_vendor() -> str:
    """The CPU's vendor string ("AuthenticAMD", "GenuineIntel"), or "" where it cannot be read."""
    return cpu_field("vendor_id") or ""


def allocator() -> str:
    """Which malloc serves this process: "tcmalloc" or "jemalloc" when one is loaded (usually by
    LD_PRELOAD), else "glibc". It changes CPU timings: glibc page-faults every fresh tensor of
    32 MiB or more on each call, tcmalloc reuses freed memory."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "unknown"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in maps:
            return name
    return "glibc" if platform.system() == "Linux" else "unknown"


def loadavg() -> str:
    """The 1/5/15-minute load averages (the machine is shared: numbers come with their load)."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def machine_info(**extra) -> dict:
    """Python, torch, platform, CPU (and GPU), threads and allocator of this process; ``extra``
    adds what the caller knows (benchmarks add which gpconv kernels ran)."""
    info = dict(python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
                cpus=os.cpu_count(), threads=torch.get_num_threads())
    cpu = cpu_field("model name")
    if cpu is not None:
        info["cpu"] = cpu
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    info["allocator"] = allocator()
    info.update(extra)
    return info
