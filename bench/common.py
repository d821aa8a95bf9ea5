"""What every benchmark in bench/ shares: the line that names the machine, the clock, the JSON file."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch


def clock() -> float:
    """Process CPU time with one thread (robust to other jobs on the machine), else wall time."""
    return time.process_time() if torch.get_num_threads() == 1 else time.perf_counter()


def machine_line(device: str | torch.device = "cpu", extra: str = "") -> str:
    """machine: host, architecture, CPUs, Python, torch and its threads (+ extra), device, load, clock."""
    device = torch.device(device)
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"machine: {platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads)"
            f"{extra}, device {device}{gpu}, load average {load}; "
            f"clock: {'process CPU time' if torch.get_num_threads() == 1 else 'wall'}")


def write_json(path: Path | None, figures: dict) -> None:
    """The figures as JSON at path (--json), if given."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=1))
