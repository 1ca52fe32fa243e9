"""What every benchmark prints first: the machine it ran on."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine(device) -> str:
    """CPU model, cores, load, torch version and threads, and the device (with the GPU's name)."""
    import torch

    device = torch.device(device)
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = f" (load {os.getloadavg()[0]:.1f})" if hasattr(os, "getloadavg") else ""
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"{cpu}, {os.cpu_count()} cores{load}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), device {device}{gpu}")
