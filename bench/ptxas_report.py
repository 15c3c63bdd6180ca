"""Registers, spills, stack and shared memory of every sit_ext CUDA kernel, from
ptxas's report in a build log.

    SIT_EXT_NVCC_FLAGS="-Xptxas -v" pip install -v --no-build-isolation . 2>&1 | tee build.log
    python bench/ptxas_report.py build.log [--arch sm_90]   # exit 1 on a spill outside float64

Prints one row per kernel and target (demangled, shortened) and fails when a
kernel that does not work in float64 spills registers to local memory.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys

_COMPILING = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse(log: str) -> list[dict]:
    """Kernels in order of appearance: name (mangled), arch, registers, stack,
    spill stores and loads, static shared memory."""
    kernels, current = [], None
    for line in log.splitlines():
        if m := _COMPILING.search(line):
            current = {"name": m.group(1), "arch": m.group(2), "registers": 0, "stack": 0,
                       "spill_stores": 0, "spill_loads": 0, "smem": 0}
            kernels.append(current)
        elif current is not None and (m := _FRAME.search(line)):
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        elif current is not None and (m := _USED.search(line)):
            current["registers"] = int(m.group(1))
            current["smem"] = int(m.group(2) or 0)
    return [k for k in kernels if "sit_ext" in k["name"]]


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def short(name: str) -> str:
    """`void sit_ext::cuda::(anonymous namespace)::adaln_forward_kernel<float, c10::BFloat16, ...>(args)`
    -> `adaln_forward_kernel<float, BFloat16, ...>`."""
    name = re.sub(r"^void |\(anonymous namespace\)::|sit_ext::cuda::|c10::|at::", "", name)
    depth = 0
    for i, ch in enumerate(name):  # cut the argument list: the first '(' outside <...>
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "(" and depth == 0:
            return name[:i]
    return name


def uses_double(name: str) -> bool:
    return "double" in name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", help="a build log with ptxas -v output ('-' for stdin)")
    parser.add_argument("--arch", help="only this target (e.g. sm_90)")
    args = parser.parse_args(argv)
    log = sys.stdin.read() if args.log == "-" else open(args.log, errors="replace").read()
    kernels = [k for k in parse(log) if args.arch in (None, k["arch"])]
    if not kernels:
        print("no ptxas report found: build with SIT_EXT_NVCC_FLAGS='-Xptxas -v' and a verbose log")
        return 1
    for k, name in zip(kernels, demangle([k["name"] for k in kernels])):
        k["short"] = short(name)
    width = max(len(k["short"]) for k in kernels)
    print(f"{'kernel':<{width}}  {'arch':<6} {'regs':>5} {'stack':>6} {'spill st':>9} {'spill ld':>9} {'smem':>6}")
    for k in sorted(kernels, key=lambda k: (k["arch"], k["short"])):
        print(f"{k['short']:<{width}}  {k['arch']:<6} {k['registers']:>5} {k['stack']:>6} "
              f"{k['spill_stores']:>9} {k['spill_loads']:>9} {k['smem']:>6}")
    spilling = [k for k in kernels if k["spill_stores"] or k["spill_loads"]]
    bad = [k for k in spilling if not uses_double(k["short"])]
    print(f"{len(kernels)} kernels, {len(spilling)} spill ({len(spilling) - len(bad)} of them float64 only)")
    for k in bad:
        print(f"SPILL: {k['short']} ({k['arch']}): {k['spill_stores']} B stores, {k['spill_loads']} B loads")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
