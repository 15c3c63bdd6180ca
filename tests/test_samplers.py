"""Step schedules, the Adams ODE solver, the SDE at the stiff data end and the
sampler benchmark, checked against exact answers (Gaussian data, whose flow is
affine, and Gaussian mixtures, whose fields are closed-form posterior mixtures)."""

import json
import math

import pytest
import torch
from test_transport import MU, PATHS, PREDICTIONS, GaussianField, exact_flow, noise, rms

from sit_ext import schedules
from sit_ext.bench import exact, samplers
from sit_ext.transport import Transport, time_grid

STIFF = torch.full((3,), 0.1)
FORMS = ["constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing"]


# ------------------------------------------------------------ time_grid


def test_uniform_grid_is_linspace():
    for start, end, n in [(1.0, 0.0, 51), (0.999, 1e-3, 250), (1e-3, 1.0, 7)]:
        assert torch.equal(time_grid(start, end, n), torch.linspace(start, end, n))


@pytest.mark.parametrize("start,end", [(1.0, 0.0), (0.0, 1.0), (0.96, 0.04)])
def test_shift_and_power_grids(start, end):
    lo, hi = min(start, end), max(start, end)
    u = torch.linspace(1, 0, 9, dtype=torch.float64) if start > end else torch.linspace(0, 1, 9, dtype=torch.float64)
    shift = lo + (hi - lo) * 3 * u / (1 + 2 * u)
    power = (lo**0.5 + u * (hi**0.5 - lo**0.5)) ** 2
    torch.testing.assert_close(time_grid(start, end, 9, "shift"), shift.float())
    torch.testing.assert_close(time_grid(start, end, 9, "power"), power.float())
    torch.testing.assert_close(time_grid(start, end, 9, "shift", 1.0), time_grid(start, end, 9))
    for schedule, param in [("shift", 0.5), ("shift", 3.0), ("power", 3.0)]:
        grid = time_grid(start, end, 9, schedule, param)
        assert grid[0] == start and grid[-1] == end  # the ends exactly
        assert (grid.diff().sign() == math.copysign(1, end - start)).all()
    # power and shift < 1 shorten the steps at the data end; shift > 1 at the noise end.
    for schedule, param, data_end_shorter in [("power", 2.0, True), ("shift", 0.5, True), ("shift", 3.0, False)]:
        steps = time_grid(0.0, 1.0, 9, schedule, param).diff()
        assert (steps[0] < steps[-1]) == data_end_shorter


def test_schedule_arguments_are_checked():
    transport = Transport()
    model = GaussianField(transport.schedule, "velocity")
    with pytest.raises(ValueError, match="unknown schedule"):
        time_grid(1.0, 0.0, 5, "cosine")
    with pytest.raises(ValueError, match="schedule_param"):
        transport.sample_ode(model, noise(4), schedule="power", schedule_param=0.0)
    with pytest.raises(ValueError, match="fixed-step"):
        transport.sample_ode(model, noise(4), method="dopri5", schedule="power")


# ------------------------------------------------------------ the ODE


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_adams_is_third_order_and_beats_heun_at_equal_evaluations(path, prediction):
    """On stiff Gaussian data (std 0.1), from the same noise as the exact flow:
    one model evaluation per step, third order (doubling 64 steps to 128 divides
    the error by 7.65 to 7.85 over the paths and predictions; a second-order
    method by about 4), and at equal NFE closer to the exact flow than Heun on
    the same schedule."""
    transport = Transport(path, prediction)
    model = GaussianField(transport.schedule, prediction, sigma=STIFF)
    lo, hi = transport.interval(sample=True)
    z = noise(2000, seed=9).double()
    exact = exact_flow(transport.schedule, z, hi, lo, sigma=STIFF)
    calls = []
    out = transport.sample_ode(lambda x, t: calls.append(t) or model(x, t), z, method="adams", num_steps=32,
                               schedule="power")
    assert len(calls) == 32
    errors = [rms(transport.sample_ode(model, z, method="adams", num_steps=n, schedule="power"), exact)
              for n in (64, 128)]
    assert errors[0] / errors[1] > 0.9 * 2**3, errors
    heun = rms(transport.sample_ode(model, z, method="heun", num_steps=16, schedule="power"), exact)
    assert rms(out, exact) < heun / 2, (rms(out, exact), heun)


def test_adams_runs_both_ways():
    transport = Transport("linear")
    model = GaussianField(transport.schedule, "velocity")
    x = MU + 0.5 * torch.randn(500, 3, dtype=torch.float64)
    z = transport.sample_ode(model, x, method="adams", num_steps=200, reverse=True)
    back = transport.sample_ode(model, z, method="adams", num_steps=200, return_trajectory=True)
    assert back.shape == (201, 500, 3)
    torch.testing.assert_close(back[-1], x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("schedule", ["uniform", "shift", "power"])
@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2), ("adams", 2)])
def test_every_method_converges_on_every_schedule(method, order, schedule):
    """Doubling the steps divides the distance to the exact flow by about 2^order
    (at least 0.9 of it; Adams is third order on the power grid)."""
    transport = Transport("linear")
    model = GaussianField(transport.schedule, "velocity", sigma=STIFF)
    z = noise(1000, seed=10).double()
    exact = exact_flow(transport.schedule, z, 1.0, 0.0, sigma=STIFF)
    coarse, fine = (rms(transport.sample_ode(model, z, method=method, num_steps=n, schedule=schedule), exact)
                    for n in (100, 200))
    assert coarse / fine > 0.9 * 2**order, (coarse, fine)


# ------------------------------------------------------------ the SDE


def z_scores(x, mean=1.0, std=0.1):
    return exact.z_scores(x, mean, std)


@pytest.mark.parametrize("form", FORMS)
def test_sde_keeps_a_stiff_variance_with_the_power_schedule(form):
    """Data N(1, 0.1^2): the official default (uniform Euler-Maruyama, 250 steps,
    "Mean" last step) misses the variance by 15 to 950 standard errors, from the
    last step's dropped noise and, for constant w, from Euler steps too long for
    w / beta^2 ~ 1 / 0.01 near t = 0. Integrating to the end on the power grid
    (rho 3) keeps mean and variance within 5 standard errors at 128 NFE."""
    transport = Transport("linear")
    model = GaussianField(transport.schedule, "velocity", mu=torch.tensor([1.0]), sigma=torch.tensor([0.1]))
    z = noise(20000, seed=11)[:, :1]
    official = transport.sample_sde(model, z, num_steps=250, diffusion_form=form,
                                    generator=torch.Generator().manual_seed(12))
    assert max(abs(v) for v in z_scores(official)) > 10
    calls = []
    fixed = transport.sample_sde(lambda x, t: calls.append(t) or model(x, t), z, num_steps=129, schedule="power",
                                 schedule_param=3.0, diffusion_form=form, last_step=None,
                                 generator=torch.Generator().manual_seed(12))
    assert len(calls) == 128
    assert max(abs(v) for v in z_scores(fixed)) < 5, z_scores(fixed)


# ------------------------------------------------------- the benchmark


@pytest.mark.parametrize("path", PATHS)
def test_mixture_fields_are_exact(path):
    """One component: the Gaussian's field; several: velocity, noise and score
    consistent through the schedule's conversions."""
    schedule = schedules.get_schedule(path)
    x_t, t = torch.randn(64, 3, dtype=torch.float64), 0.05 + 0.9 * torch.rand(64, dtype=torch.float64)
    one = exact.GaussianMixture([MU.tolist()], [0.1])
    for prediction in PREDICTIONS:
        torch.testing.assert_close(one.model(schedule, prediction)(x_t, t),
                                   GaussianField(schedule, prediction, sigma=STIFF)(x_t, t))
    mixture = exact.GaussianMixture(torch.randn(5, 3, dtype=torch.float64), [0.1, 0.2, 0.3, 0.4, 0.5],
                                            [1, 2, 3, 4, 5])
    v, eps, s = (mixture.model(schedule, p)(x_t, t) for p in PREDICTIONS)
    torch.testing.assert_close(schedule.velocity_from_score(s, x_t, t), v)
    torch.testing.assert_close(schedule.noise_from_score(s, x_t, t), eps)


def test_mixture_flow_reference():
    """The dopri5 reference (two identical components) equals the closed-form flow of one."""
    pytest.importorskip("torchdiffeq")
    schedule = schedules.Linear()
    z = noise(500, seed=13).double()
    one = exact.GaussianMixture([MU.tolist()], [0.1])
    two = exact.GaussianMixture([MU.tolist(), MU.tolist()], [0.1, 0.1])
    torch.testing.assert_close(two.flow(schedule, z, 1.0, 0.0), one.flow(schedule, z, 1.0, 0.0), atol=1e-7, rtol=0)
    torch.testing.assert_close(one.flow(schedule, z, 1.0, 0.0), exact_flow(schedule, z, 1.0, 0.0, sigma=STIFF))


def test_sliced_w1_is_exact_for_repeated_and_shifted_points():
    x = torch.randn(100, 2, dtype=torch.float64)
    distance = exact.SlicedW1(x.repeat(3, 1), 100, projections=16)
    assert distance(x) == pytest.approx(0.0, abs=1e-12)
    shift = torch.tensor([0.3, -0.4], dtype=torch.float64)
    assert distance(x + shift) == pytest.approx((shift @ distance.dirs).abs().mean().item(), rel=1e-9)


def test_quick_benchmark_writes_json_and_png(tmp_path):
    result = samplers.run(str(tmp_path), quick=True, verbose=False)
    (json_path,) = tmp_path.glob("*-cpu-samplers.json")
    (png_path,) = tmp_path.glob("*-cpu-samplers.png")
    assert png_path.stat().st_size > 10_000
    saved = json.loads(json_path.read_text())
    assert saved["meta"]["quick"] and saved["meta"]["samples"] == 1000
    assert saved["meta"]["nfe"] == list(samplers.QUICK_NFES)
    schedule_labels = {samplers._schedule_label(s) for s in samplers.SCHEDULES}
    for data in ("gaussian", "mixture"):
        ode = {(r["method"], r["schedule"]) for r in saved["ode"] if r["data"] == data}
        assert ode == {(m, s) for m in samplers.ODE_METHODS for s in schedule_labels}
        sde = {(r["method"], r["schedule"], r["last_step"]) for r in saved["sde"] if r["data"] == data}
        assert ("euler", "uniform", "Mean") in sde and len(sde) == 2 * len(schedule_labels) + 1
    assert all(r["rms_error"] >= 0 for r in saved["ode"]) and all("sliced_w1" in r or "z_var" in r
                                                                  for r in saved["sde"])
    assert {r["form"] for r in saved["stiff_end"]} == set(FORMS)
    assert saved["goals"]["baseline_rms_error"] == result["baseline"]["rms_error"] > 0
    assert set(saved["goals"]) >= {"nfe_to_reach_baseline", "ode_goal_met", "sde_at_goal_nfe", "sde_goal_met"}


def test_digits_run_writes_its_rows(tmp_path):
    """The trained-model check's code path, on a model trained for 3 steps (its numbers need ~1500)."""
    pytest.importorskip("sklearn")
    result = samplers.run_digits(str(tmp_path), steps=3, nfe=[4], per_class=2, verbose=False)
    assert [(r["method"], r["nfe"]) for r in result["rows"]] == [("heun", 4), ("adams", 4)]
    assert all(0 <= r["accuracy"] <= 1 and r["frechet"] >= 0 for r in result["rows"])
    assert result["real_accuracy"] > 0.9 and list(tmp_path.glob("*-samplers-digits.json"))
