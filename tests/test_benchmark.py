"""CPU smoke tests of the benchmark harness (sit_ext.bench, bench/run.py):
the budget, JSON after every row, byte counts, the timing fallbacks, the
autocast cases' guard and the profile table. Timings are faked where only the
bookkeeping is under test, so the file runs in seconds."""

import contextlib
import importlib.util
import json
import math
import os

import pytest
import torch

from sit_ext import ops
from sit_ext import reference as ref
from sit_ext.bench import harness, model_cases, model_runner, op_cases, op_runner, profiling

CPU = torch.device("cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_MS = {"fused": 1.0, "eager": 2.0, "compiled": 4.0}


@pytest.fixture(autouse=True)
def _no_reexec(monkeypatch):
    # bench/run.py restarts itself with glibc malloc settings unless they are set: keep pytest's process.
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=4294967296")


@pytest.fixture
def clock(monkeypatch):
    """The budget clock, advanced 1 s by every (fake) timed case."""
    now = [0.0]
    monkeypatch.setattr(harness, "now", lambda: now[0])

    def fake_time_variants(calls, device, launch=()):
        for name, variant_calls in calls.items():
            if name != "compiled":  # no compiling here: the inputs and the call must at least work
                variant_calls[0]()
        now[0] += 1.0
        return {name: {"seconds": FAKE_MS[name] / 1e3, "timing": "wall"} for name in calls}

    monkeypatch.setattr(op_runner, "time_variants", fake_time_variants)
    return now


def load_run_py():
    spec = importlib.util.spec_from_file_location("bench_run", os.path.join(ROOT, "bench", "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def by_name(cases):
    return {(c.op, c.mode): c for c in cases}


# ------------------------------------------------------------------ bytes


def test_bytes_of_the_mixed_cases_by_hand():
    # [B, T, D] = [2, 4, 8]: n = 64 activations, v = 16 per modulation vector; fp32 4 bytes, bf16 2.
    shape = (2, 4, 8)
    mixed = by_name(op_cases.adaln_cases(shape, "autocast", CPU, "t", compile_=False))
    plain = by_name(op_cases.adaln_cases(shape, "float32", CPU, "t", compile_=False))
    # fwd: x 256 + h 128 + gate, shift, scale 3 * 32 + x_out 256 + y 128.
    assert mixed["gated_residual_ln_modulate", "fwd"].bytes == 864
    # bwd adds d x_out 256 + dy 128 + x_out 256 + h 128 + gate, scale 64 + dx 256 + dh 128 + 3 vectors 96.
    assert mixed["gated_residual_ln_modulate", "fwd+bwd"].bytes == 864 + 1312
    assert plain["gated_residual_ln_modulate", "fwd"].bytes == 4 * 256 + 3 * 64
    # ln_modulate fwd: x 256 + shift, scale 64 + y 128; gated_residual fwd: x 256 + h 128 + gate 32 + out 256.
    assert mixed["ln_modulate", "fwd"].bytes == 448
    assert mixed["gated_residual", "fwd"].bytes == 672
    assert mixed["ln_modulate", "fwd"].dtypes == {"x": "float32", "h": "bfloat16", "shift_scale_gate": "bfloat16",
                                                  "y": "bfloat16"}
    assert plain["ln_modulate", "fwd"].dtypes == {}

    loss = by_name(op_cases.mse_cases(shape, "autocast", CPU, "t", compile_=False))
    # pred bf16 128 + target fp32 256 + the loss 4; bwd: its grad 4 + pred 128 + target 256 + dpred 128.
    assert loss["mse", "fwd"].bytes == 388
    assert loss["mse", "fwd+bwd"].bytes == 388 + 516
    velocity = by_name(op_cases.velocity_mse_cases(shape, "autocast", CPU, "t", compile_=False))
    # pred 128 + x, noise 512 + t 8 + the loss 4.
    assert velocity["velocity_mse", "fwd"].bytes == 652
    assert op_cases.interpolant_cases(shape, "autocast", CPU, "t") == []  # float32 data: the float32 case
    mlp = by_name(op_cases.mlp_cases(shape, "float32", CPU, "t", compile_=False))
    # x 64 + w1, w2 2 * 256 + b1 32 + out 64 values; bwd: d out 64, x 64, the weights twice, dx 64.
    assert mlp["gelu_mlp", "fwd"].bytes == 4 * (64 + 544 + 64)
    assert mlp["gelu_mlp", "fwd+bwd"].bytes == 4 * (64 + 544 + 64) + 4 * (2 * 64 + 2 * 544 + 64)
    assert op_cases.mlp_cases(shape, "autocast", CPU, "t") == []  # the op casts: the bfloat16 case


# ------------------------------------------------------------------ timing


def test_capture_is_impossible_on_the_cpu():
    graph, why = harness.capture_graph([lambda: None], CPU)
    assert graph is None and "cpu" in why


class FakeClock:
    """Seconds that pass only when a fake call says so: timing logic tested
    exactly, with no wall-clock windows on a loaded machine."""

    def __init__(self):
        self.now = 0.0
        self.calls = 0

    def __call__(self):
        return self.now

    def taking(self, *seconds):
        """A call that takes seconds[0], then seconds[1], ... (cycling)."""
        def call():
            self.now += seconds[self.calls % len(seconds)]
            self.calls += 1
        return call


def test_time_medians_takes_the_median_of_turns_until_the_time_is_up():
    clock = FakeClock()
    # 7 rounds at least: the median of 3, 1, 2, 100, 2, 1, 3 ms is 2 ms (their mean, 16 ms).
    skewed = clock.taking(3e-3, 1e-3, 2e-3, 100e-3, 2e-3, 1e-3, 3e-3)
    got = harness.time_medians({"a": skewed}, CPU, warmup=0, min_seconds=0, clock=clock)
    assert got == pytest.approx({"a": 2e-3}, rel=1e-9) and clock.calls == 7
    # Then rounds until min_seconds: 0.48 s of 10 ms calls in turn with 40 ms ones is 10 rounds, after 3 warm-ups.
    clock = FakeClock()
    fast, slow = clock.taking(10e-3), clock.taking(40e-3)
    got = harness.time_medians({"fast": fast, "slow": slow}, CPU, warmup=3, min_seconds=0.48, clock=clock)
    assert got == pytest.approx({"fast": 10e-3, "slow": 40e-3}, rel=1e-9) and clock.calls == 2 * (3 + 10)


def test_time_variants_mixes_graphs_and_fallbacks(monkeypatch):
    class FakeGraph:  # what a capture returns: replay runs the captured calls
        def __init__(self, calls):
            self.calls = calls

        def replay(self):
            for call in self.calls:
                call()

    def fake_capture(calls, device):
        return (FakeGraph(calls), "") if calls is captured else (None, "capture failed")

    def boom():
        raise RuntimeError("boom")

    clock = FakeClock()
    captured = [clock.taking(1e-3)] * 8  # 8 input copies, 1 ms a call
    plain = [clock.taking(3e-3)] * 4
    monkeypatch.setattr(harness, "capture_graph", fake_capture)
    report = harness.time_variants({"graphed": captured, "plain": plain, "broken": [boom]}, CPU, clock=clock)
    assert report["graphed"]["timing"] == "graph" and report["plain"]["timing"] == "wall"
    assert report["broken"] == {"error": "RuntimeError: boom"}
    # per call: a sample of 8 (4) calls divided by 8 (4)
    assert report["graphed"]["seconds"] == pytest.approx(1e-3, rel=1e-9), report
    assert report["plain"]["seconds"] == pytest.approx(3e-3, rel=1e-9), report


def test_cuda_branch_with_a_fake_cuda(monkeypatch):
    """The CUDA path's bookkeeping, with streams, events and graphs faked: a
    graph records the Python calls made during capture and replays them."""
    capturing = []

    class Call:
        def __init__(self, capturable=True):
            self.capturable = capturable

        def __call__(self):
            if capturing:
                if not self.capturable:
                    raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
                capturing[-1].append(self)
            else:
                clock.now += 1e-4

    class Graph:
        def __init__(self):
            self.calls = []

        def replay(self):
            for call in self.calls:
                call()

    @contextlib.contextmanager
    def graph(g):
        capturing.append(g.calls)
        try:
            yield
        finally:
            capturing.pop()

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = clock()

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    stream = type("Stream", (), {"wait_stream": lambda self, other: None})
    fakes = dict(Stream=lambda *a: stream(), stream=lambda s: contextlib.nullcontext(),
                 current_stream=lambda *a: stream(), set_stream=lambda s: None, CUDAGraph=Graph, graph=graph,
                 Event=Event, synchronize=lambda *a: None, empty_cache=lambda: None)
    for name, fake in fakes.items():
        monkeypatch.setattr(torch.cuda, name, fake)

    def oom():
        raise MemoryError("CUDA out of memory")

    clock = FakeClock()
    calls = {"fused": [Call() for _ in range(4)], "compiled": [Call(capturable=False) for _ in range(4)],
             "broken": [oom]}
    report = harness.time_variants(calls, torch.device("cuda"), launch=("fused",), clock=clock)
    assert report["fused"]["timing"] == "graph" and report["fused_launch"]["timing"] == "events"
    assert report["compiled"]["timing"] == "events" and "capturing" in report["compiled"]["graph_error"]
    assert report["broken"] == {"error": "MemoryError: CUDA out of memory"}
    # 0.1 ms a call: per call, not per replay of 4 calls nor per sample of 3 replays (0.4 ms each,
    # repeated to span _SAMPLE_SECONDS, 1 ms)
    for name in ("fused", "fused_launch", "compiled"):
        assert report[name]["seconds"] == pytest.approx(1e-4, rel=1e-9), report


def test_run_on_the_cpu_for_real(tmp_path):
    out = tmp_path / "ops.json"
    result = op_runner.run(["mse"], "cpu", batches=[2], quick=True, out=str(out), compile_=False, log=lambda s: None)
    xl = [2, 256, 1152]
    assert [(r["mode"], r["shape"]) for r in result["results"]] == [("fwd", xl), ("fwd+bwd", xl)]
    for row in result["results"]:
        assert row["fused"]["timing"] == row["eager"]["timing"] == "wall" and row["copies"] == 1
        assert row["fused"]["ms"] > 0 and row["x_vs_eager"] > 0 and math.isnan(row["x_vs_compiled"])
        assert "fused_launch" not in row and "compiled" not in row
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(result["results"]))


# ------------------------------------------------------------------ budget and JSON


def test_budget_stops_starting_cases_and_keeps_the_json(tmp_path, clock):
    out, lines = tmp_path / "ops.json", []
    result = op_runner.run(["mse", "velocity_mse"], "cpu", batches=[2], quick=True, out=str(out), budget=1.5,
                           log=lines.append)
    # Two cases fit (the second starts at 1 s), the other two are skipped.
    assert result["planned"] == 4 and result["skipped"] == 2 and len(result["results"]) == 2
    assert any("skipped 2 of 4 cases" in line for line in lines)
    saved = json.loads(out.read_text())
    assert saved["skipped"] == 2 and len(saved["results"]) == 2
    row = saved["results"][0]
    assert row["x_vs_eager"] == pytest.approx(2.0) and row["x_vs_compiled"] == pytest.approx(4.0)
    assert row["fused"]["gbs"] == pytest.approx(row["bytes"] / 1e-3 / 1e9)


def test_json_is_written_after_every_row(tmp_path, clock, monkeypatch):
    timed = op_runner.time_variants

    def killed_on_the_second_case(calls, device, launch=()):
        if clock[0] >= 1:
            raise KeyboardInterrupt  # a time limit's kill, as far as the file is concerned
        return timed(calls, device, launch)

    monkeypatch.setattr(op_runner, "time_variants", killed_on_the_second_case)
    out = tmp_path / "ops.json"
    with pytest.raises(KeyboardInterrupt):
        op_runner.run(["mse"], "cpu", batches=[2], quick=True, out=str(out), log=lambda s: None)
    assert [r["mode"] for r in json.loads(out.read_text())["results"]] == ["fwd"]


def test_run_py_budget_zero_exits_cleanly(tmp_path, capsys):
    out = tmp_path / "ops.json"
    load_run_py().main(["--device", "cpu", "--op", "mse", "--batch", "2", "--quick", "--budget", "0",
                        "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["results"] == [] and saved["skipped"] == saved["planned"] == 2 and saved["budget_s"] == 0
    assert "skipped 2 of 2 cases" in capsys.readouterr().out


# ------------------------------------------------------------------ autocast guard


def _capable_ops(monkeypatch):
    """Fused AdaLN ops that take the mixed dtypes (the references, cast as out_dtype says)."""
    monkeypatch.setattr(ops, "ln_modulate", op_cases._AdaLNReference.ln_modulate)
    monkeypatch.setattr(ops, "gated_residual_ln_modulate", op_cases._AdaLNReference.gated_residual_ln_modulate)
    monkeypatch.setattr(ops, "gated_residual", ref.gated_residual)


def test_autocast_cases_run_when_the_ops_take_mixed_dtypes(monkeypatch):
    _capable_ops(monkeypatch)
    cases = by_name(op_cases.adaln_cases((2, 8, 16), "autocast", CPU, "t", compile_=False))
    assert all(c.skip is None for c in cases.values())
    row = op_runner.run_case(cases["gated_residual_ln_modulate", "fwd+bwd"], CPU)
    assert row["dtype"] == "autocast" and row["dtypes"]["y"] == "bfloat16"
    assert row["fused"]["ms"] > 0 and row["eager"]["ms"] > 0


def test_autocast_cases_are_skipped_with_a_note_when_the_ops_refuse(tmp_path, clock, monkeypatch):
    _capable_ops(monkeypatch)

    def refuses(x, shift, scale, eps=1e-6):  # the API before out_dtype
        raise TypeError("ln_modulate() got an unexpected keyword argument 'out_dtype'")

    monkeypatch.setattr(ops, "ln_modulate", refuses)
    lines = []
    result = op_runner.run(["adaln"], "cpu", dtypes=["autocast"], batches=[2], quick=True, out=str(tmp_path / "o.json"),
                           log=lines.append)
    assert {r["op"] for r in result["results"]} == {"gated_residual_ln_modulate", "gated_residual"}
    assert result["unsupported"][0]["op"] == "ln_modulate" and "out_dtype" in result["unsupported"][0]["why"]
    assert any(line.startswith("# ln_modulate autocast: skipped") for line in lines)


def test_autocast_guard_catches_a_wrong_output_dtype(monkeypatch):
    _capable_ops(monkeypatch)
    monkeypatch.setattr(ops, "ln_modulate", lambda x, shift, scale, out_dtype=None: ref.ln_modulate(x, shift, scale))
    cases = by_name(op_cases.adaln_cases((2, 8, 16), "autocast", CPU, "t", compile_=False))
    assert "returned float32 where the reference returns bfloat16" in cases["ln_modulate", "fwd"].skip
    assert cases["gated_residual", "fwd"].skip is None


# ------------------------------------------------------------------ models and profile


def test_top_kernels():
    top = profiling.top_kernels([("a", 10.0), ("b", 30.0), ("a", 25.0), ("c", 5.0)], steps=2, top=2)
    assert [(k["name"], k["calls"]) for k in top["top"]] == [("a", 2), ("b", 1)]
    assert top["top"][0]["total_ms"] == pytest.approx(0.035) and top["top"][0]["share"] == pytest.approx(0.5)
    assert top["busy_ms_per_step"] == pytest.approx(0.035)


def test_run_models_batches_profile_and_budget(tmp_path, monkeypatch, capsys):
    from sit_ext import models

    monkeypatch.setitem(models.SiT_models, "SiT-tiny", models._preset(2, 64, 2, 8))  # 2 blocks, D = 64, 16 tokens
    timed = harness.time_medians
    monkeypatch.setattr(model_runner, "time_medians",
                        lambda fns, device, **kw: timed(fns, device, warmup=1, min_rounds=1, min_seconds=0))
    out = tmp_path / "models.json"
    load_run_py().main(["--models", "--device", "cpu", "--model", "SiT-tiny", "--batch", "1", "2", "--no-compile",
                        "--profile", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [(r["mode"], r["batch"]) for r in saved["results"]] == [
        ("train step", 1), ("guided sample step", 1), ("train step", 2), ("guided sample step", 2)]
    train = saved["results"][0]
    assert train["fused"]["ms"] > 0 and train["unfused"]["ms"] > 0 and "fused+compile" not in train
    assert train["fused-nofold"]["ms"] > 0  # the biases left to the Linears, for comparison
    assert train["fused-mlp"]["ms"] > 0  # fc1, GELU and fc2 as one op, for comparison
    assert train["fused-batchadaln"]["ms"] > 0  # every adaLN modulation in one GEMM, for comparison
    assert "fused+graph" not in train  # CUDA only
    assert train["x_best_unfused"] == pytest.approx(train["unfused"]["ms"] / train["fused"]["ms"])
    assert train["tflop"] == pytest.approx(3 * model_cases.sit_forward_flops(models.SiT_models["SiT-tiny"](), 1) / 1e12)
    for variant in ("fused", "unfused"):
        profile = train["profile"][variant]
        assert 0 < len(profile["top"]) <= 15 and profile["steps"] == 3
        assert 0 < sum(k["share"] for k in profile["top"]) <= 1 + 1e-9
    assert "profile" not in saved["results"][1]
    assert "# profile SiT-tiny train step batch 1 fused" in capsys.readouterr().out

    result = model_runner.run_models("cpu", ["SiT-tiny"], [1, 2], compile_=False, out=str(out), budget=0,
                                  log=lambda s: None)
    assert result["results"] == [] and result["skipped"] == 4 == json.loads(out.read_text())["skipped"]


def test_compiled_namespace_compiles_each_function():
    """The "compiled" AdaLN variant must be torch.compile'd functions, not the eager ones."""
    compiled = op_cases._compiled(op_cases._AdaLNReference)
    for name in ("ln_modulate", "gated_residual_ln_modulate", "gated_residual"):
        fn = getattr(compiled, name)
        assert fn is not getattr(op_cases._AdaLNReference, name)
        assert getattr(fn, "_torchdynamo_orig_callable", None) is getattr(op_cases._AdaLNReference, name)


def test_sit_forward_flops_by_hand():
    """The analytic count of SiT-XL/2 on 256 tokens: 446 M token-Linear
    weights (the figure of the H200 profile), the patch embedding, attention's
    4 T^2 D a block and the per-sample Linears."""
    from sit_ext import models

    model = models.SiT_models["SiT-XL/2"]()
    d, t, depth = 1152, 256, 28
    token_linears = depth * 12 * d * d + d * 2 * 2 * 8  # blocks, then the final layer (p^2 * 2C outputs)
    assert token_linears == pytest.approx(446e6, rel=1e-3)
    per_sample = depth * 6 * d * d + 2 * d * d + 256 * d + d * d  # adaLN of blocks and final layer, t MLP
    want = 2 * (t * (token_linears + 4 * 2 * 2 * d + 2 * t * d * depth) + per_sample)
    assert model_cases.sit_forward_flops(model, 1) == pytest.approx(want, rel=1e-12)
    assert model_cases.model_step_flops(model, "train step", 32) == pytest.approx(3 * 32 * want, rel=1e-12)
    assert model_cases.model_step_flops(model, "guided sample step", 32) == pytest.approx(64 * want, rel=1e-12)


def test_summarize_model_row_and_peaks(monkeypatch):
    row = {"fused": {"ms": 10.0}, "unfused": {"ms": 13.0}, "fused+compile": {"ms": 8.0},
           "unfused+compile": {"ms": 12.0}, "unfused+graph": {"error": "OutOfMemoryError: ..."},
           "fused-nofold": {"ms": 7.0}, "fused-mlp": {"ms": 7.5}, "fused-batchadaln": {"ms": 7.9}}
    model_runner.summarize_model_row(row, flops=4e12, peak=1000.0)
    # the comparisons (fused-nofold, fused-mlp, fused-batchadaln) are never the best fused variant
    assert (row["best_fused"], row["best_unfused"]) == ("fused+compile", "unfused+compile")
    assert row["x_best_unfused"] == pytest.approx(12.0 / 8.0)
    assert row["fused+compile"]["tflops"] == pytest.approx(500.0) and row["fused+compile"]["mfu"] == 0.5
    assert "tflops" not in row["unfused+graph"]
    line = model_runner.format_model_row({"model": "m", "mode": "train step", "batch": 1, "dtype": "bfloat16", **row})
    assert "error" in line and "1.50" in line and "50.0%" in line
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert model_cases.peak_tflops(torch.device("cuda")) == 756.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert model_cases.peak_tflops(torch.device("cuda")) == 989.4
    assert model_cases.peak_tflops(torch.device("cpu")) is None
