"""What was compiled into sit_ext._C, and whether its CUDA kernels can run here."""

from __future__ import annotations

import json
import re

import torch

_ARCH = re.compile(r"^(\d+)\.(\d+)([af]?)(\+PTX)?$")


def _arch_runs(arch: str, capability: tuple[int, int]) -> bool:
    """Whether code built for `arch` runs on `capability`. "8.0": SASS, runs on
    the same major with an equal or higher minor; "9.0a": arch-specific, runs on
    that exact capability only; "10.0f": family-specific, the same major with an
    equal or higher minor; a "+PTX" suffix adds PTX, which the driver compiles
    for anything at least as new (for "a" targets, that exact capability only).
    An entry of another form runs nowhere that this function can vouch for."""
    m = _ARCH.match(arch.strip())
    if m is None:
        return False
    major, minor, variant, ptx = int(m.group(1)), int(m.group(2)), m.group(3), bool(m.group(4))
    if variant == "a":
        return capability == (major, minor)
    if ptx and variant == "" and capability >= (major, minor):
        return True
    return capability[0] == major and capability[1] >= minor


def build_info() -> dict:
    """Backends compiled, CUDA archs, the torch version built against and the
    one running, the CPU SIMD level, and whether the CUDA kernels are usable now."""
    info = json.loads(torch.ops.sit_ext.build_info())
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("sit_ext::interpolant", "CUDA")
    info["backends"] = ["CPU", "CUDA"] if has_cuda else ["CPU"]
    info["cuda_archs"] = [a for a in info["cuda_archs"].replace(" ", ";").split(";") if a]
    info["torch_runtime_version"] = torch.__version__
    info["cuda_device"] = None
    usable = False
    if has_cuda and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability()
        info["cuda_device"] = f"{torch.cuda.get_device_name()} (sm_{capability[0]}{capability[1]})"
        usable = any(_arch_runs(a, capability) for a in info["cuda_archs"])
    info["cuda_usable"] = usable
    return info


def format_build_info(info: dict) -> str:
    archs = ", ".join(info["cuda_archs"]) or "-"
    return "\n".join([
        f"backends:         {', '.join(info['backends'])}",
        f"cuda archs:       {archs}",
        f"cpu simd:         {info['cpu_capability']}",
        f"built with torch: {info['torch_version']}",
        f"running torch:    {info['torch_runtime_version']}",
        f"cuda device:      {info['cuda_device'] or 'none'}",
        f"cuda usable now:  {'yes' if info['cuda_usable'] else 'no'}",
    ])
