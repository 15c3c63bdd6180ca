"""The tuned sampler (sit_ext.tuned): it starts as its base solver, a fit
improves the 8-mode mixture, it is never worse than the base on held-out noise,
and it survives a round trip through its file."""

import pytest
import torch

from sit_ext.bench import exact
from sit_ext.solvers import TunedSampler
from sit_ext.transport import Transport
from sit_ext.tuned import (
    endpoint_rms,
    initial_sampler,
    iterations_within,
    load_sampler,
    mismatches,
    save_sampler,
    solve_reference,
    tune_sampler,
)

MIXTURE = exact.narrow_mixture()
# 128 Adams steps: 2e-5 from the exact flow on the mixture (measured), a 150th of Heun@50's error.
FIT_REFERENCE = {"method": "adams", "num_steps": 128, "schedule": "shift", "schedule_param": 0.5}
CHEAP = {"method": "adams", "num_steps": 32, "schedule": "shift", "schedule_param": 0.5}  # where accuracy is moot


def setting(path="linear"):
    transport = Transport(path, "velocity")
    return transport, MIXTURE.model(transport.schedule)


def noise(n, seed, dtype=torch.float32):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def accurate(transport, model, z):
    """The flow from z by 400 Adams steps: 2e-6 from the exact flow on the mixture (dopri5 at rtol 1e-10
    measured it), a thousandth of the errors compared here, in a tenth of the time."""
    return transport.sample_ode(model, z, method="adams", num_steps=400, schedule="shift", schedule_param=0.5)


@pytest.mark.parametrize("path", ["linear", "cosine"])
@pytest.mark.parametrize("base, nfe, schedule", [("heun", 8, ("uniform", None)), ("heun", 6, ("shift", 3.0)),
                                                 ("adams", 8, ("shift", 0.5)), ("adams", 5, ("power", 2.0))])
def test_the_start_is_the_base_solver(path, base, nfe, schedule):
    """Order consistency: at its initial params the tuned sampler is the base
    solver on the same grid, to float64 rounding, at every node."""
    transport, model = setting(path)
    z = noise(512, 0, torch.float64)
    sampler = initial_sampler(transport, nfe, base, *schedule)
    steps = sampler.settings["steps"]
    assert sampler.nfe == nfe and steps == (nfe // 2 if base == "heun" else nfe)
    tuned = transport.sample_ode(model, z, sampler=sampler, return_trajectory=True)
    fixed = transport.sample_ode(model, z, method=base, num_steps=steps, schedule=schedule[0],
                                 schedule_param=schedule[1], return_trajectory=True)
    assert tuned.shape == fixed.shape == (steps + 1, 512, 2)
    assert (tuned - fixed).abs().max().item() < 1e-13
    assert endpoint_rms(tuned[-1], fixed[-1]) < 1e-14


def test_a_fit_improves_the_mixture_at_8_nfe():
    """Adams at 8 evaluations on the linear path: the fit at least halves the
    error to the exact flow on noise it never saw."""
    transport, model = setting()
    batches = [noise(128, seed) for seed in (1, 2, 3)]
    sampler = tune_sampler(transport, model, batches, 8, "adams", schedule="shift", schedule_param=0.5,
                           iterations=25, progress=False, reference=FIT_REFERENCE)
    assert sampler.settings["accepted"] and sampler.settings["iterations"] > 0
    assert sampler.settings["heldout_rms"] < sampler.settings["base_heldout_rms"]
    test = noise(500, 4)
    exact = accurate(transport, model, test)
    tuned = endpoint_rms(transport.sample_ode(model, test, sampler=sampler), exact)
    base = endpoint_rms(transport.sample_ode(model, test, method="adams", num_steps=8, schedule="shift",
                                             schedule_param=0.5), exact)
    assert tuned < 0.5 * base, (tuned, base)


@pytest.mark.parametrize("base, nfe", [("adams", 4), ("heun", 4), ("adams", 8)])
def test_never_worse_than_the_base_on_held_out_noise(base, nfe):
    """A fit that goes wrong (a step size of 30 on a tiny batch) is refused on
    the held-out batch: the base solver comes back, so on any noise the tuned
    sampler's error is the base's."""
    transport, model = setting()
    batches = [noise(8, 5), noise(128, 6)]
    sampler = tune_sampler(transport, model, batches, nfe, base, optimizer="adam", iterations=4, lr=30.0, eval_every=2,
                           reference=CHEAP, progress=False)
    start = initial_sampler(transport, nfe, base)
    assert not sampler.settings["accepted"]
    assert sampler.settings["heldout_rms"] == sampler.settings["base_heldout_rms"]
    for name, value in start.params.items():
        assert torch.equal(sampler.params[name], value), name
    test = noise(500, 7, torch.float64)  # float64: the two differ by float64 rounding alone
    exact = accurate(transport, model, test)
    tuned = endpoint_rms(transport.sample_ode(model, test, sampler=sampler), exact)
    fixed = endpoint_rms(transport.sample_ode(model, test, method=base, num_steps=start.settings["steps"]), exact)
    assert tuned <= fixed * (1 + 1e-12)


def test_file_round_trip(tmp_path):
    transport, model = setting("cosine")
    sampler = initial_sampler(transport, 6, "heun", "shift", 3.0)
    for i, v in enumerate(sampler.params.values()):  # params away from their start
        v += 0.01 * (i + 1) * torch.arange(v.numel(), dtype=v.dtype).reshape(v.shape) / v.numel()
    sampler.settings |= {"checkpoint_digest": "ab" * 16, "checkpoint": "run/latest.pt", "cfg_scale": 2.0}
    path = str(tmp_path / "s.safetensors")
    save_sampler(path, sampler)
    again = load_sampler(path)
    assert again.settings == sampler.settings
    assert all(torch.equal(again.params[k], v) for k, v in sampler.params.items())
    z = noise(64, 8)
    assert torch.equal(transport.sample_ode(model, z, sampler=again), transport.sample_ode(model, z, sampler=sampler))
    assert mismatches(again, cfg_scale=2.0, checkpoint_digest="ab" * 16) == []
    assert mismatches(again, cfg_scale=1.0, nfe=6) == ["cfg_scale: fitted 2.0, used 1.0"]


def test_refusals(tmp_path):
    from sit_ext.models import save_safetensors

    transport, model = setting()
    other = str(tmp_path / "weights.safetensors")
    save_safetensors(other, {"w": torch.zeros(3)}, {"config": "{}"})
    with pytest.raises(ValueError, match="weights.safetensors.*not a sit-ext sampler"):
        load_sampler(other)
    sampler = initial_sampler(transport, 4, "adams")
    with pytest.raises(ValueError, match="grid_logits"):
        TunedSampler({**sampler.params, "grid_logits": torch.zeros(5, dtype=torch.float64)}, sampler.settings)
    with pytest.raises(ValueError, match="from t = 1.0 to 0.0; this transport samples from 0.999 to 0.001"):
        Transport("linear", "noise").sample_ode(model, noise(4, 0), sampler=sampler)
    with pytest.raises(ValueError, match="nfe must be even"):
        initial_sampler(transport, 5, "heun")
    with pytest.raises(ValueError, match="noise_batches"):
        tune_sampler(transport, model, [noise(4, 0)], 4, progress=False)


def test_cli_tune_then_sample(tmp_path, capsys):
    """tune-sampler writes the checkpoint's digest and path, the NFE, the base
    and the guidance into the file; sample --sampler draws with it (the sampler's
    NFE exactly), and --force goes past a mismatch with one warning line."""
    from sit_ext import cli

    run, out = tmp_path / "run", str(tmp_path / "s.safetensors")
    tiny = ["--hidden-size", "32", "--depth", "1", "--heads", "2", "--batch-size", "16", "--device", "cpu", "--quiet"]
    assert cli.main(["train", "--data", "moons", "--steps", "2", "--out", str(run), *tiny]) == 0
    ckpt = str(run / "latest.pt")
    assert cli.main(["tune-sampler", "--ckpt", ckpt, "--nfe", "2", "--samples", "4", "--held-out", "2",
                     "--iterations", "1", "--reference-steps", "2", "--device", "cpu", "--quiet", "--out", out]) == 0
    sampler = load_sampler(out)
    assert sampler.settings["checkpoint_digest"] == cli._file_digest(ckpt)
    assert sampler.settings["checkpoint"] == ckpt and sampler.settings["weights"] == "ema"
    assert (sampler.nfe, sampler.base, sampler.settings["cfg_scale"]) == (2, "adams", 1.0)
    capsys.readouterr()
    assert cli.main(["sample", "--ckpt", ckpt, "--sampler", out, "--num-samples", "4", "--device", "cpu",
                     "--quiet", "--out", str(tmp_path / "a")]) == 0
    import argparse

    import numpy as np

    model, transport, shape, *_ = cli._load_sampler(argparse.Namespace(ckpt=ckpt, official=None, weights="ema",
                                                                       num_samples=4, fused=True, model=None,
                                                                       image_size=None), "cpu")
    z = torch.randn(4, *shape, generator=torch.Generator("cpu").manual_seed(0))  # sample's noise for --seed 0
    drawn = torch.from_numpy(np.load(tmp_path / "a" / "samples.npz")["samples"])
    assert torch.equal(drawn, transport.sample_ode(model, z, sampler=sampler))
    assert cli.main(["sample", "--ckpt", ckpt, "--sampler", out, "--weights", "model", "--force", "--num-samples",
                     "4", "--device", "cpu", "--quiet", "--out", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and "--weights" in err[0]


def counting(model):
    """The model and a list holding the rows it has evaluated."""
    rows = [0]

    def counted(x, t, **kwargs):
        rows[0] += x.shape[0]
        return model(x, t, **kwargs)

    return counted, rows


def test_precomputed_reference_endpoints_replace_the_reference_solve():
    """solve_reference once, then tune_sampler(reference_endpoints=...): the
    same fit as solving inside, and not one model row spent on a reference:
    every row counted outside is a fit or held-out row, none a reference row."""
    transport, model = setting("cosine")
    batches = [noise(64, 11), noise(64, 12)]
    counted, rows = counting(model)
    inside = tune_sampler(transport, counted, batches, 6, "adams", reference=CHEAP, iterations=6, eval_every=3,
                          progress=False)
    assert inside.settings["reference_evaluations"] == 128 * 32  # two batches of 64, 32 Adams steps each
    assert rows[0] == inside.settings["fit_evaluations"] + inside.settings["other_evaluations"]
    endpoints = solve_reference(transport, model, batches, reference=CHEAP)
    rows[0] = 0
    given = tune_sampler(transport, counted, batches, 6, "adams", reference_endpoints=endpoints, iterations=6,
                         eval_every=3, progress=False)
    s = given.settings
    assert s["reference_evaluations"] == 0 and s["reference"] == "given"
    assert rows[0] == s["fit_evaluations"] + s["heldout_evaluations"] == s["fit_evaluations"] + s["other_evaluations"]
    assert rows[0] == inside.settings["fit_evaluations"] + inside.settings["heldout_evaluations"]
    assert s["heldout_rms"] == inside.settings["heldout_rms"] and s["accepted"]
    assert all(torch.equal(given.params[k], v) for k, v in inside.params.items())


def test_reference_endpoints_of_the_wrong_shape_or_count_are_refused():
    transport, model = setting()
    batches = [noise(16, 1), noise(8, 2)]
    with pytest.raises(ValueError, match=r"reference_endpoints\[1\] has shape \(16, 2\); noise batch 1 has \(8, 2\)"):
        tune_sampler(transport, model, batches, 4, reference_endpoints=[noise(16, 3), noise(16, 4)], progress=False)
    with pytest.raises(ValueError, match=r"reference_endpoints must hold one tensor per noise batch \(2\), got 1"):
        tune_sampler(transport, model, batches, 4, reference_endpoints=[noise(16, 3)], progress=False)
    with pytest.raises(ValueError, match="reference_endpoints must hold one tensor per noise batch"):
        tune_sampler(transport, model, batches, 4, reference_endpoints=noise(16, 3), progress=False)


@pytest.mark.parametrize("iterations, eval_every", [(3, 5), (7, 2)])
def test_iterations_cap_the_fit_rows(iterations, eval_every):
    """iterations is a hard cap on loss-and-gradient evaluations, L-BFGS line
    searches included, so the fit's rows are known before it runs; each
    held-out check costs one held-out solve (the base's included)."""
    transport, model = setting()
    batches = [noise(32, 21), noise(32, 22), noise(16, 23)]
    nfe = 6
    counted, rows = counting(model)
    endpoints = solve_reference(transport, model, batches, reference=CHEAP)
    sampler = tune_sampler(transport, counted, batches, nfe, "adams", reference_endpoints=endpoints,
                           iterations=iterations, eval_every=eval_every, patience=100, progress=False)
    s = sampler.settings
    assert s["iterations"] == iterations  # far from converged: the cap, not convergence, stopped it
    assert s["fit_evaluations"] == iterations * 64 * nfe
    checks = s["heldout_evaluations"] // (16 * nfe)
    assert s["heldout_evaluations"] == checks * 16 * nfe and 2 <= checks <= 1 + -(-iterations // eval_every)
    assert rows[0] == s["fit_evaluations"] + s["heldout_evaluations"]


@pytest.mark.parametrize("budget, eval_every", [(4000, 5), (12000, 5), (12000, 2)])
def test_iterations_within_keeps_a_fit_inside_its_row_budget(budget, eval_every):
    """iterations_within sizes a fit (reference solve, fit and held-out checks)
    to a budget of model rows: counted outside, the fit spends no more, it
    ran every evaluation it was given, and one more would not have fitted."""
    transport, model = setting("cosine")
    batches = [noise(24, 31), noise(16, 32)]
    nfe = 6
    k = iterations_within(budget, nfe, 24, 16, reference_rows=40 * 32, eval_every=eval_every)
    assert k >= 1
    counted, rows = counting(model)
    sampler = tune_sampler(transport, counted, batches, nfe, "adams", reference=CHEAP, iterations=k,
                           eval_every=eval_every, patience=100, progress=False)
    assert sampler.settings["iterations"] == k and sampler.settings["reference_evaluations"] == 40 * 32
    assert budget - nfe * (24 + 16) < rows[0] <= budget, (rows[0], budget, k)  # one more evaluation would not fit
