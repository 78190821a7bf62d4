"""What ran a benchmark, for its JSON: package versions and the machine (Python, CPUs, torch, GPU)."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version


def versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of `names` (packages not installed are left out)."""
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def machine(**extra) -> dict:
    """Python, CPU count, torch and the GPU (where there is one), plus `extra`."""
    out = {"python": platform.python_version(), "cpus": os.cpu_count(), **extra}
    try:
        import torch
    except ImportError:
        return out
    out["torch"] = torch.__version__
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out
