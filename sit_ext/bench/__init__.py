"""The benchmarks behind `sit-ext bench` and bench/*.py: each fused op against
its eager reference and against torch.compile(reference, dynamic=False),
forward and forward + backward; the SiT model matrix, {fused, unfused} x
{eager, torch.compile, CUDA graph}, for the train step and the guided sampling
step; the per-call (dispatch) cost; the samplers against exact answers.

- harness: timing (medians of variants taking turns, CUDA graphs, the copy
  ceiling) and the budget's clock;
- report: the log, the machine's description, JSON written after every row;
- op_cases, op_runner: the op cases with their byte counts; running them;
- model_cases, model_runner: the model matrix's cases with the FLOP count and
  peaks; running them, with MFU;
- profiling: the top kernels of a step (torch.profiler);
- dispatch: `sit-ext bench --dispatch`;
- samplers: `sit-ext bench --samplers` (and `--digits`), scored against the
  data with exact answers of exact; tuned: `--tuned`.

The modules are imported where they are used; this file imports none of them.
"""
