"""The machine a benchmark ran on, in words, for the header line of its results table."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> str:
    """``"<CPU model>, <n> cores, no GPU"`` (or ``GPU <names>``)."""
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if cpuinfo.is_file() else platform.processor()
    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    return f"{cpu}, {os.cpu_count()} cores, " + (f"GPU {', '.join(gpus)}" if gpus else "no GPU")
