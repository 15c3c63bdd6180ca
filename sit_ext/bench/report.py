"""What every benchmark run records: its log lines, the machine it ran on, and
its JSON, rewritten after every row."""

from __future__ import annotations

import datetime
import json
import os
import platform

import torch

from .._build import build_info


def _print(line: str) -> None:
    print(line, flush=True)  # a run cut off by a time limit keeps its lines


def machine_info(device: torch.device) -> dict:
    info = {
        "malloc": os.environ.get("GLIBC_TUNABLES", "default"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
        "build": build_info(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _write_json(path: str | None, result: dict) -> None:
    """Writes atomically: a run killed mid-write leaves the previous file."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)
