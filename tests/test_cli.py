"""The sit-ext command: every command in its smoke form, resume equals an
uninterrupted run, atomic checkpoints, DDP on CPU, the demo's quality, and bad
input (a message and a non-zero exit, never a traceback)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from sit_ext import _build, cli, training

TINY = ["--hidden-size", "32", "--depth", "2", "--heads", "2", "--batch-size", "64", "--lr", "1e-3",
        "--device", "cpu", "--quiet"]


@pytest.fixture(autouse=True)
def _no_reexec(monkeypatch):
    # `bench` restarts itself with glibc malloc settings unless they are set: keep pytest's process.
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=4294967296")


def run_cli(*args):
    return cli.main([str(a) for a in args])


def losses(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_info(capsys):
    assert run_cli("info") == 0
    out = capsys.readouterr().out
    assert "backends:" in out and "cuda usable now:" in out and "device:" in out


@pytest.mark.parametrize("arch, capability, runs", [
    ("8.0", (8, 6), True), ("8.0", (9, 0), False), ("8.6", (8, 0), False),
    ("9.0+PTX", (10, 0), True), ("9.0+PTX", (8, 9), False),
    # Machines preset TORCH_CUDA_ARCH_LIST=9.0a: `sit-ext info` once died parsing "0a".
    ("9.0a", (9, 0), True), ("9.0a", (10, 0), False), ("9.0a+PTX", (10, 0), False),
    ("10.0f", (10, 3), True), ("10.0f", (12, 0), False), ("sm_90", (9, 0), False),
])
def test_arch_runs(arch, capability, runs):
    assert _build._arch_runs(arch, capability) is runs


def test_train_bf16_autocast_on_cpu(tmp_path, monkeypatch):
    """--precision bf16: the model predicts in bfloat16 while the data stay
    float32 (seen by a hook on the model the run builds), and the losses differ
    from the same run in float32."""
    ran_in = []
    build_model = training.build_model

    def build_and_watch(cfg, ds):
        model = build_model(cfg, ds)
        model.register_forward_hook(lambda module, args, out: ran_in.append((args[0].dtype, out.dtype)))
        return model

    monkeypatch.setattr(training, "build_model", build_and_watch)
    runs = {}
    for precision in ("fp32", "bf16"):
        ran_in.clear()
        runs[precision] = tmp_path / precision
        assert run_cli("train", "--data", "moons", "--steps", 6, "--log-every", 3, "--precision", precision,
                       "--out", runs[precision], *TINY) == 0
        predicted = torch.bfloat16 if precision == "bf16" else torch.float32
        assert len(ran_in) == 6 and set(ran_in) == {(torch.float32, predicted)}, (precision, ran_in)
        assert len(losses(runs[precision])) == 2 and all(np.isfinite(losses(runs[precision])))
    assert losses(runs["bf16"]) != losses(runs["fp32"])


def test_train_then_sample_points(tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", "--data", "moons", "--steps", 20, "--log-every", 5, "--out", run, *TINY) == 0
    assert len(losses(run)) == 4 and all(np.isfinite(losses(run)))
    ckpt = training.load_checkpoint(str(run / "latest.pt"))
    assert ckpt["step"] == 20 and ckpt["config"]["data"] == "moons"
    for method, solver in (("ode", "heun"), ("sde", "euler")):
        out = tmp_path / method
        assert run_cli("sample", "--ckpt", run / "latest.pt", "--num-samples", 50, "--method", method,
                       "--solver", solver, "--steps", 10, "--out", out, "--device", "cpu", "--quiet") == 0
        samples = np.load(out / "samples.npz")["samples"]
        assert samples.shape == (50, 2) and np.isfinite(samples).all()
        assert (out / "samples.png").stat().st_size > 1000


def test_train_then_sample_digits_with_cfg(tmp_path):
    pytest.importorskip("sklearn")
    run = tmp_path / "run"
    assert run_cli("train", "--data", "digits", "--model", "SiT-S/2", "--steps", 3, "--out", run, *TINY) == 0
    out = tmp_path / "samples"
    assert run_cli("sample", "--ckpt", run / "latest.pt", "--num-samples", 10, "--labels", 3, 7, "--cfg-scale", 2,
                   "--steps", 4, "--out", out, "--device", "cpu", "--quiet") == 0
    saved = np.load(out / "samples.npz")
    assert saved["samples"].shape == (10, 1, 8, 8) and list(saved["labels"][:4]) == [3, 7, 3, 7]
    assert (out / "samples.png").exists()


def test_resume_equals_uninterrupted(tmp_path):
    common = ["--data", "8gaussians", "--log-every", 1, "--ckpt-every", 6, *TINY]
    assert run_cli("train", "--steps", 12, "--out", tmp_path / "straight", *common) == 0
    assert run_cli("train", "--steps", 6, "--out", tmp_path / "split", *common) == 0
    assert run_cli("train", "--steps", 12, "--out", tmp_path / "split", "--resume", *common) == 0
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")
    a = training.load_checkpoint(str(tmp_path / "straight" / "latest.pt"))
    b = training.load_checkpoint(str(tmp_path / "split" / "latest.pt"))
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])


def test_crash_mid_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "latest.pt")
    training.save_checkpoint(path, {"model": {"w": torch.ones(3)}, "config": {}, "step": 1})

    def crash(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        training.save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "config": {}, "step": 2})
    monkeypatch.undo()
    ckpt = training.load_checkpoint(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


# Runs `sit-ext <args>` on every rank and saves what the run did there: its final
# weights, EMA and the indices it drew at each step (rank<r>.pt in argv[1]).
DDP_PROBE = """
import sys

import torch

from sit_ext import cli, training

drawn, next_batch, train = [], training.ShardedBatches.next, training.train


def record_batch(self):
    drawn.append(next_batch(self))
    return drawn[-1]


def record_run(*args, **kwargs):
    summary = train(*args, **kwargs)
    state = {"model": summary["model"].state_dict(), "ema": summary["ema"].state_dict(), "drawn": drawn}
    torch.save(state, f"{sys.argv[1]}/rank{summary['rank']}.pt")
    return summary


training.ShardedBatches.next, training.train = record_batch, record_run
sys.exit(cli.main(sys.argv[2:]))
"""


def test_ddp_two_cpu_processes(tmp_path):
    """Two CPU ranks: they draw disjoint halves of each epoch, and their
    weights and EMAs are identical after training (the EMA started from each
    rank's own initial weights, not the broadcast ones)."""
    run, probe = tmp_path / "ddp", tmp_path / "probe.py"
    probe.write_text(DDP_PROBE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           probe, tmp_path, "train", "--data", "moons", "--data-size", 256, "--steps", 6, "--ckpt-every", 3,
           "--log-every", 1, "--out", run, *TINY]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = training.load_checkpoint(str(run / "latest.pt"))
    assert ckpt["step"] == 6 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # per-rank seeds
    assert len(losses(run)) == 6 and all(np.isfinite(losses(run)))  # rank 0 logs, once per step
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for part in ("model", "ema"):
        differ = [(rank, name) for rank in (0, 1) for name, value in ckpt[part].items()
                  if not torch.equal(ranks[rank][part][name], value)]
        assert differ == [], f"{part}: (rank, tensor) unlike the checkpoint: {differ}"
    # 64 of 256 indices per rank and step: each pair of steps is one epoch, split between the ranks.
    drawn = [torch.stack(r["drawn"]) for r in ranks]
    assert drawn[0].shape == drawn[1].shape == (6, 64)
    for epoch in range(3):
        both = torch.cat([d[2 * epoch : 2 * epoch + 2].flatten() for d in drawn])
        assert sorted(both.tolist()) == list(range(256)), epoch


def test_demo_quality(tmp_path, capsys, monkeypatch):
    """The README's main job, shortened: 600 steps on moons with seed 0 must
    sample within 0.1 sliced-W1 of held-out data (two draws of the data are
    about 0.035 apart; an untrained model is over 1.0 away). It writes into a
    new temporary folder, and prints the README's quoted output line for line,
    numbers and that folder's name aside."""
    import re
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert run_cli("demo", "--steps", 600, "--device", "cpu", "--quiet") == 0
    (out_dir,) = tmp_path.glob("sit-ext-demo-*")
    result = json.loads((out_dir / "demo.json").read_text())
    assert result["sliced_wasserstein"] < 0.1, result
    assert result["fused_step_ms"] > 0 and result["unfused_step_ms"] > 0
    assert (out_dir / "samples.png").exists()
    printed = capsys.readouterr().out.strip().splitlines()
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    quoted = re.search(r"<!-- demo-output -->\n```text\n(.*?)```", readme, re.DOTALL).group(1).strip().splitlines()

    def shape(line: str) -> str:
        return re.sub(r"\d+(\.\d+)?", "#", re.sub(r"\S*/sit-ext-demo-[^/\s,]+", "FOLDER", line))

    assert [shape(line) for line in printed] == [shape(line) for line in quoted], printed
    assert printed[0].endswith(f"output in {out_dir}"), printed[0]


def test_bench_smoke(tmp_path):
    assert run_cli("bench", "--quick", "--ops", "mse", "--no-models", "--device", "cpu", "--out", tmp_path) == 0
    names = os.listdir(tmp_path)
    assert any(n.endswith("-ops.json") for n in names) and any(n.endswith("-speedups.png") for n in names)


def test_bench_quick_shows_a_dash_for_what_did_not_run(tmp_path, capsys, monkeypatch):
    """--quick runs no torch.compile: its ratio is a dash, not nan, and the chart has no legend entry for it."""
    from sit_ext import plots

    charts = []
    monkeypatch.setattr(plots, "speedup_bars", lambda path, labels, series, title="": charts.append(series))
    assert run_cli("bench", "--quick", "--ops", "mse", "--no-models", "--device", "cpu", "--out", tmp_path) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("mse ")]
    assert len(rows) == 2 and all("nan" not in row and row.split()[-4] == "—" for row in rows), rows
    assert [list(series) for series in charts] == [["vs eager"]]


def test_sample_official_checkpoint(tmp_path):
    from sit_ext.models import SiT_models

    torch.manual_seed(0)
    path = tmp_path / "official.pt"
    torch.save(SiT_models["SiT-S/8"]().state_dict(), path)
    out = tmp_path / "samples"
    assert run_cli("sample", "--official", path, "--model", "SiT-S/8", "--num-samples", 2, "--steps", 2,
                   "--cfg-scale", 1.5, "--out", out, "--device", "cpu", "--quiet") == 0
    assert np.load(out / "samples.npz")["samples"].shape == (2, 4, 32, 32)
    # --weights picks the entry of an official training checkpoint (it was ignored: always the EMA).
    both = tmp_path / "both.pt"
    ema = torch.load(path, weights_only=True)
    model = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in ema.items()}
    torch.save({"model": model, "ema": ema}, both)
    drawn = {}
    for weights in ("ema", "model"):
        assert run_cli("sample", "--official", both, "--model", "SiT-S/8", "--num-samples", 2, "--steps", 2,
                       "--weights", weights, "--out", tmp_path / weights, "--device", "cpu", "--quiet") == 0
        drawn[weights] = np.load(tmp_path / weights / "samples.npz")["samples"]
    assert np.array_equal(drawn["ema"], np.load(out / "samples.npz")["samples"])
    assert not np.array_equal(drawn["ema"], drawn["model"])
    assert run_cli("sample", "--official", path, "--model", "SiT-S/8", "--weights", "model", "--out", out,
                   "--device", "cpu", "--quiet") == 2  # a plain state dict has one set of weights


def expect_clean_failure(capsys, *args, fragment):
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err


def test_bad_input(tmp_path, capsys):
    expect_clean_failure(capsys, "sample", "--ckpt", tmp_path / "missing.pt", fragment="does not exist")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"c" + bytes(range(256)) * 8)  # starts with pickle's GLOBAL opcode
    expect_clean_failure(capsys, "sample", "--ckpt", corrupt, fragment="is truncated or corrupt")
    expect_clean_failure(capsys, "train", "--data", "digits", "--model", "SiT-Q/2", "--out", tmp_path / "q",
                         *TINY, fragment="unknown model")
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_clean_failure(capsys, "train", "--data", empty, "--out", tmp_path / "e", *TINY, fragment="no .npy")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.save(mixed / "a.npy", np.zeros((4, 4), dtype=np.float32))
    np.save(mixed / "b.npy", np.zeros((3, 4), dtype=np.float32))
    expect_clean_failure(capsys, "train", "--data", mixed, "--out", tmp_path / "m", *TINY, fragment="shapes")
    expect_clean_failure(capsys, "train", "--data", "spiral", "--out", tmp_path / "s", *TINY, fragment="unknown data")
    # A checkpoint for another model: a sit_ext run given where an official SiT-XL/2 file is expected.
    run = tmp_path / "run"
    assert run_cli("train", "--data", "moons", "--steps", 2, "--out", run, *TINY) == 0
    expect_clean_failure(capsys, "sample", "--official", run / "latest.pt", "--model", "SiT-S/8",
                         "--device", "cpu", fragment="does not match")


def test_folder_data_with_labels(tmp_path):
    folder = tmp_path / "latents"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        np.save(folder / f"{i:03d}.npy", rng.standard_normal((2, 4, 4)).astype(np.float32))
    np.save(folder / "labels.npy", np.arange(12) % 3)
    run = tmp_path / "run"
    assert run_cli("train", "--data", folder, "--model", "SiT-S/2", "--steps", 2, "--out", run, *TINY) == 0
    ckpt = training.load_checkpoint(str(run / "latest.pt"))
    assert ckpt["data"]["shape"] == [2, 4, 4] and ckpt["data"]["num_classes"] == 3


def test_demo_digits_smoke(tmp_path):
    """The class-conditional demo's code path (its quality needs ~1500 steps; see the README)."""
    pytest.importorskip("sklearn")
    assert run_cli("demo", "--data", "digits", "--steps", 2, "--out", tmp_path, "--device", "cpu", "--quiet") == 0
    result = json.loads((tmp_path / "demo.json").read_text())
    assert 0 <= result["class_accuracy"] <= 1 and result["real_accuracy"] > 0.9
    assert np.load(tmp_path / "samples.npz")["samples"].shape == (200, 1, 8, 8)


@pytest.mark.skipif(shutil.which("nm") is None, reason="no nm")
def test_extension_uses_the_shared_cxx_runtime():
    """A static libstdc++ inside sit_ext._C (a compiler wrapper adding
    -static-libstdc++) made every error message a segfault on an H200 image;
    setup.py links the shared one and refuses a build that holds a copy."""
    from sit_ext import _C

    out = subprocess.run(["nm", "-D", "--defined-only", _C.__file__], capture_output=True, text=True, check=True)
    assert "__cxa_throw" not in out.stdout.split()


def test_help_shows_every_default_once():
    """Each option with a default says it once in --help; none says "None"."""
    p = cli.parser()
    commands = next(a for a in p._actions if isinstance(a, __import__("argparse")._SubParsersAction)).choices
    for name, command in commands.items():
        for action in command._actions:
            if not action.option_strings or action.help == "==SUPPRESS==":
                continue
            text = command._get_formatter()._expand_help(action) if action.help else ""
            assert text.count("default") <= 1, (name, action.option_strings, text)
            assert "default: None" not in text, (name, action.option_strings, text)
            if action.default not in (None, False) and action.option_strings != ["-h", "--help"]:
                assert "default" in text, (name, action.option_strings, text)


def test_train_prints_a_header_and_a_latents_folder_gets_an_image_preset(tmp_path, capsys):
    """Before the progress bar: model, parameter count, data, device, precision, fused. A folder of
    [C, H, W] arrays trains SiT-S/2 without --model, and the run's config records that preset."""
    folder = tmp_path / "latents"
    folder.mkdir()
    for i in range(4):
        np.save(folder / f"{i:02d}.npy", np.random.default_rng(i).standard_normal((2, 4, 4)).astype(np.float32))
    run = tmp_path / "run"
    capsys.readouterr()
    assert run_cli("train", "--data", folder, "--steps", 1, "--out", run, "--hidden-size", 32, "--depth", 1,
                   "--heads", 2, "--batch-size", 2, "--device", "cpu", "--quiet") == 0
    header = capsys.readouterr().out.splitlines()[0]
    model = training.build_model(training.TrainConfig(model="SiT-S/2", hidden_size=32, depth=1, heads=2),
                                 training.data_lib.load(str(folder)))
    params = sum(p.numel() for p in model.parameters())
    assert header == (f"sit-ext train: SiT-S/2 ({params / 1e6:.2f} M parameters) on latents [4 x 2 x 4 x 4], cpu, "
                      f"fp32, fused kernels; 1 steps; out {run}"), header
    assert json.loads((run / "config.json").read_text())["model"] == "SiT-S/2"
    assert training.load_checkpoint(str(run / "latest.pt"))["config"]["model"] == "SiT-S/2"


def test_resume_reads_the_checkpoint_once_and_counts_its_own_steps(tmp_path, capsys, monkeypatch):
    common = ["--data", "moons", "--out", tmp_path / "run", *TINY]
    assert run_cli("train", "--steps", 3, *common) == 0
    reads, merges = [], []
    real_load, real_merge = training.torch_load, training.resume_config
    monkeypatch.setattr(training, "torch_load", lambda *a, **k: reads.append(a) or real_load(*a, **k))
    monkeypatch.setattr(training, "resume_config", lambda *a, **k: merges.append(a) or real_merge(*a, **k))
    capsys.readouterr()
    assert run_cli("train", "--resume", "--steps", 5, *common) == 0
    assert len(reads) == 1 and len(merges) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "resumed at step 3 of 5" in lines[0], lines
    assert lines[-1].startswith("trained 2 steps (steps 3 to 5), loss "), lines


def test_sample_eps_on_a_velocity_run_warns_once(tmp_path, capsys):
    """--sample-eps with linear velocity is read only by some SDE settings: a one-line warning, not a refusal."""
    assert run_cli("train", "--data", "moons", "--steps", 1, "--sample-eps", "0.01", "--out", tmp_path / "r",
                   *TINY) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sit-ext train: warning: --sample-eps") and "official" in err[0], err


def test_an_image_folder_given_as_data_points_to_encode(tmp_path, capsys):
    from sit_ext import images as images_lib

    (tmp_path / "pictures" / "cats").mkdir(parents=True)
    images_lib.save_png(str(tmp_path / "pictures" / "cats" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    expect_clean_failure(capsys, "train", "--data", tmp_path / "pictures", "--out", tmp_path / "r", *TINY,
                         fragment="sit-ext encode --images")


def test_help_is_plain_text(capsys):
    """--help shows the docstrings as text: no reStructuredText ``literals``."""
    for argv in (["--help"], *([name, "--help"] for name in ("train", "sample", "bench", "demo", "evaluate"))):
        assert cli.main(argv) == 0
        text = capsys.readouterr().out
        assert "sit-ext" in text and "``" not in text, (argv, text)
