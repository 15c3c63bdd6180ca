"""Benchmarks: fused vs eager vs torch.compile, on CPU and CUDA.

    python bench/run.py                      # every op, on CUDA if present, else CPU
    python bench/run.py --op velocity_mse --device cpu --batch 16
    python bench/run.py --quick              # one size, one batch
    python bench/run.py --budget 150         # stop starting cases after 150 s
    python bench/run.py --models --batch 32 256 --profile   # SiT train step and sampling forward

On CUDA each op is timed from CUDA graph replays (GPU time without launch
overhead); the default sweep is SiT-B and SiT-XL, T = 256, batch 32 and 256,
dtypes bfloat16, autocast (float32 x with bfloat16 h and vectors) and float32.
Prints a table of medians, ratios and GB/s, and writes JSON under bench/results/
after every row.
"""

import argparse
import datetime
import os
import re

import torch

from sit_ext.bench import harness, model_runner, op_cases, op_runner

HERE = os.path.dirname(os.path.abspath(__file__))


def default_out(device: str) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return os.path.join(HERE, "results", f"{datetime.date.today()}-{slug}-ops.json")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", nargs="+", default=["all"], choices=["all", *op_cases.OP_FAMILIES])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16", "float16", op_cases.AUTOCAST],
                        help="ops: default bfloat16 autocast float32 on CUDA, float32 on CPU; "
                             "--models: the first one (default bfloat16 autocast on CUDA)")
    parser.add_argument("--batch", nargs="+", type=int, help="default 32 256 on CUDA (--models: 32)")
    parser.add_argument("--quick", action="store_true", help="SiT-XL size and one batch only")
    parser.add_argument("--models", action="store_true",
                        help="benchmark SiT models (train step, guided sampling step) instead of ops")
    parser.add_argument("--model", nargs="+",
                        help="presets for --models (default on CUDA: SiT-XL/2 at batch 32 and 256, SiT-B/2 at "
                             "256; SiT-S/2 on CPU)")
    parser.add_argument("--no-compile", action="store_true", help="without the torch.compile variants")
    parser.add_argument("--profile", action="store_true",
                        help="--models: top-15 kernels of the fused and unfused eager train steps (torch.profiler)")
    parser.add_argument("--peak-tflops", type=float,
                        help="--models: dense bf16 peak for MFU (default: the datasheet value of the GPU)")
    parser.add_argument("--budget", type=float, metavar="SECONDS",
                        help="start no case after this many seconds of benchmarking; write what ran, exit 0")
    parser.add_argument("--out", help="JSON path (default: bench/results/<date>-<device>-ops.json or -models.json)")
    args = parser.parse_args(argv)
    harness.reexec_with_stable_allocator()
    if args.models:
        out = args.out or default_out(args.device).replace("-ops.json", "-models.json")
        model_runner.run_models(args.device, args.model, args.batch, args.dtype[0] if args.dtype else None,
                                not args.no_compile, out, budget=args.budget, profile=args.profile,
                                peak=args.peak_tflops)
        return
    ops = list(op_cases.OP_FAMILIES) if "all" in args.op else args.op
    op_runner.run(ops, args.device, args.dtype, args.batch, args.quick, args.out or default_out(args.device),
                  budget=args.budget, compile_=not args.no_compile)


if __name__ == "__main__":
    main()
