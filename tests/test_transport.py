"""sit_ext.transport checked against exact answers: for Gaussian data
x ~ N(mu, diag sigma^2) the velocity, score and noise fields of every path are
known in closed form, so samplers and likelihoods can be checked with no
trained network."""

import math

import pytest
import torch

from sit_ext import schedules
from sit_ext.transport import Transport, create_transport

MU = torch.tensor([1.5, -0.5, 0.25])
SIGMA = torch.tensor([0.5, 1.2, 0.8])
PATHS = ["linear", "cosine", "vp"]
PREDICTIONS = ["velocity", "noise", "score"]


class GaussianField(torch.nn.Module):
    """The exact model output for data N(mu, diag sigma^2) under a schedule:
    E[u_t | x_t], E[eps | x_t] or the score, in sit_ext time or the official's."""

    def __init__(self, schedule, prediction, official=False, mu=MU, sigma=SIGMA):
        super().__init__()
        self.schedule, self.prediction, self.official = schedule, prediction, official
        self.mu, self.sigma = mu, sigma

    def forward(self, x_t, t, y=None):
        if self.official:
            t = 1 - t
        a, b, da, db = (schedules.per_sample(c, x_t) for c in self.schedule.coefficients(t))
        mu, sigma = self.mu.to(x_t), self.sigma.to(x_t)
        var = a * a * sigma**2 + b * b
        r = x_t - a * mu
        e_eps = b * r / var
        e_x = mu + a * sigma**2 * r / var
        out = {"velocity": da * e_x + db * e_eps, "noise": e_eps, "score": -r / var}[self.prediction]
        return -out if self.official and self.prediction == "velocity" else out


def check_gaussian(samples, mean_tol=0.05, var_rel_tol=0.08):
    mean, var = samples.mean(0), samples.var(0)
    assert torch.all((mean - MU).abs() < mean_tol), (mean, MU)
    assert torch.all((var / SIGMA**2 - 1).abs() < var_rel_tol), (var, SIGMA**2)


def noise(n=20000, seed=0):
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("path", PATHS + ["custom"])
def test_conversions_are_exact(path):
    schedule = (schedules.Custom(lambda t: 1 - t**2, lambda t: t) if path == "custom"
                else schedules.get_schedule(path))
    x_t, t = torch.randn(64, 3, dtype=torch.float64), 0.05 + 0.9 * torch.rand(64, dtype=torch.float64)
    fields = {p: GaussianField(schedule, p)(x_t, t) for p in PREDICTIONS}
    v, eps, s = fields["velocity"], fields["noise"], fields["score"]
    for got, want in [(schedule.velocity_from_score(s, x_t, t), v), (schedule.velocity_from_noise(eps, x_t, t), v),
                      (schedule.score_from_velocity(v, x_t, t), s), (schedule.noise_from_velocity(v, x_t, t), eps),
                      (schedule.score_from_noise(eps, x_t, t), s), (schedule.noise_from_score(s, x_t, t), eps)]:
        torch.testing.assert_close(got, want)


def test_custom_schedule_derivatives_by_autograd():
    custom = schedules.Custom(lambda t: torch.cos(math.pi / 2 * t), lambda t: torch.sin(math.pi / 2 * t))
    t = torch.rand(16, dtype=torch.float64)
    for got, want in zip(custom.coefficients(t), schedules.Cosine().coefficients(t)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("method,steps", [("euler", 200), ("heun", 50)])
def test_ode_maps_noise_to_data(path, prediction, method, steps):
    transport = Transport(path, prediction)
    model = GaussianField(transport.schedule, prediction)
    check_gaussian(transport.sample_ode(model, noise(), method=method, num_steps=steps))


def test_ode_dopri5():
    pytest.importorskip("torchdiffeq")
    transport = Transport("linear")
    model = GaussianField(transport.schedule, "velocity")
    check_gaussian(transport.sample_ode(model, noise(), method="dopri5", atol=1e-6, rtol=1e-5))


def test_adaptive_solver_needs_torchdiffeq(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torchdiffeq(name, *args, **kwargs):
        if name == "torchdiffeq":
            raise ImportError("No module named 'torchdiffeq'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchdiffeq)
    transport = Transport()
    with pytest.raises(ImportError, match="pip install torchdiffeq"):
        transport.sample_ode(GaussianField(transport.schedule, "velocity"), noise(10), method="dopri5")


@pytest.mark.parametrize("form", ["constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing"])
@pytest.mark.parametrize("path", ["vp", "linear"])
def test_sde_forms_map_noise_to_data(form, path):
    # SBDM on the linear path is stiff near t = 1 (w ~ 1 / (1 - t)): start it at 0.98.
    transport = Transport(path, "velocity", sample_eps=0.02 if (form, path) == ("SBDM", "linear") else None)
    model = GaussianField(transport.schedule, "velocity")
    gen = torch.Generator().manual_seed(1)
    # No last step: the SDE itself keeps the path's marginals down to t = sample_eps. (A "Mean"
    # last step drops a step's noise, which under-disperses when w stays large near t = 0.)
    out = transport.sample_sde(model, noise(10000), num_steps=250, diffusion_form=form, last_step=None,
                               generator=gen)
    check_gaussian(out, mean_tol=0.06, var_rel_tol=0.1)


@pytest.mark.parametrize("last_step", [None, "Mean", "Tweedie", "Euler"])
def test_sde_heun_and_last_steps(last_step):
    transport = Transport("linear", "score")
    model = GaussianField(transport.schedule, "score")
    gen = torch.Generator().manual_seed(2)
    out = transport.sample_sde(model, noise(10000), method="heun", num_steps=100, last_step=last_step,
                               generator=gen)
    check_gaussian(out, mean_tol=0.06, var_rel_tol=0.1)


def test_sde_is_reproducible_with_a_generator():
    transport = Transport()
    model = GaussianField(transport.schedule, "velocity")
    runs = [transport.sample_sde(model, noise(100), num_steps=20, generator=torch.Generator().manual_seed(5))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("path", PATHS)
def test_reverse_then_forward_returns_the_input(path):
    transport = Transport(path)
    model = GaussianField(transport.schedule, "velocity")
    x = MU + SIGMA * torch.randn(500, 3, dtype=torch.float64)
    z = transport.sample_ode(model, x, num_steps=200, reverse=True)
    torch.testing.assert_close(transport.sample_ode(model, z, num_steps=200), x, atol=2e-4, rtol=1e-4)


def gaussian_logpdf(x):
    return (-0.5 * ((x - MU.double()) / SIGMA.double()) ** 2 - torch.log(SIGMA.double())
            - 0.5 * math.log(2 * math.pi)).sum(1)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_likelihood_matches_the_analytic_density(path):
    transport = Transport(path)
    model = GaussianField(transport.schedule, "velocity")
    x = MU + SIGMA * torch.randn(64, 3, dtype=torch.float64)
    got = transport.log_likelihood(model, x, num_steps=200)
    torch.testing.assert_close(got["logp"], gaussian_logpdf(x), atol=2e-3, rtol=0)
    torch.testing.assert_close(got["bits_per_dim"], -gaussian_logpdf(x) / (3 * math.log(2)), atol=1e-3, rtol=0)


def test_likelihood_hutchinson_is_unbiased():
    transport = Transport()
    model = GaussianField(transport.schedule, "velocity")
    x = MU + SIGMA * torch.randn(256, 3, dtype=torch.float64)
    got = transport.log_likelihood(model, x, num_steps=100, exact=False, num_probes=4,
                                   generator=torch.Generator().manual_seed(0))
    assert abs((got["logp"] - gaussian_logpdf(x)).mean()) < 0.05


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("weight", [None, "velocity", "likelihood"])
def test_fused_and_reference_losses_agree(path, prediction, weight):
    model = torch.nn.Linear(3, 3).double()
    x = MU + SIGMA * torch.randn(32, 3, dtype=torch.float64)
    losses = []
    for fused in (True, False):
        transport = Transport(path, prediction, weight, fused=fused)
        out = transport.training_losses(lambda x_t, t: model(x_t), x, generator=torch.Generator().manual_seed(3))
        losses.append(out["loss"])
        assert out["loss"].shape == (32,) and out["pred"].shape == x.shape
    torch.testing.assert_close(losses[0], losses[1])


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_low_precision_losses_accumulate_in_float32(prediction):
    """bfloat16 prediction, data and noise: the loss is float32 fused and
    unfused (unfused returned a bfloat16 mean of squares, 1e-2 off), as close
    to the float64 loss of the same inputs as float32 accumulation allows."""
    pred, x, noise = (torch.randn(16, 64, dtype=torch.bfloat16) for _ in range(3))
    t = torch.rand(16) * 0.9 + 0.05
    exact = Transport("linear", prediction, fused=False).loss(pred.double(), x.double(), noise.double(), t.double())
    for fused in (True, False):
        got = Transport("linear", prediction, fused=fused).loss(pred, x, noise, t)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=0)


def linear_path_loss(prediction, weight, pred, x, eps, t):
    """The official losses on the linear path (alpha = 1 - t, beta = t), written
    out: velocity mean (pred - (eps - x))^2, noise mean (pred - eps)^2, score
    mean (t pred + eps)^2; weighted by (w / beta)^2 ("velocity") or w / beta^2
    ("likelihood"), with the forward SDE's w = g^2 / 2 = t / (1 - t)."""
    tt = t[:, None]
    target = {"velocity": eps - x, "noise": eps, "score": -eps / tt}[prediction]
    loss = ((pred - target) ** 2).mean(1)
    if prediction == "score":
        loss = loss * t**2
    if prediction == "velocity" or weight is None:
        return loss
    return loss * (1 / (1 - t) ** 2 if weight == "velocity" else 1 / (t * (1 - t)))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("weight", [None, "velocity", "likelihood"])
def test_losses_match_the_written_out_formulas(fused, prediction, weight):
    """Each target and weighting against its formula, in float64 to float64's
    precision: a weighting rounded through float32 is 1e-8 off."""
    gen = torch.Generator().manual_seed(4)
    pred, x, eps = (torch.randn(64, 5, dtype=torch.float64, generator=gen) for _ in range(3))
    t = 0.05 + 0.9 * torch.rand(64, dtype=torch.float64, generator=gen)
    got = Transport("linear", prediction, weight, fused=fused).loss(pred, x, eps, t)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, linear_path_loss(prediction, weight, pred, x, eps, t), rtol=1e-12, atol=0)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("weight", [None, "likelihood"])
def test_exact_fields_have_the_smallest_loss(prediction, weight):
    """The loss is minimised by the exact field, on both sides (0.95x and
    1.05x): a check that targets and weightings are consistent with the
    samplers' conversions."""
    transport = Transport("linear", prediction, weight)
    exact = GaussianField(transport.schedule, prediction)
    x = MU + SIGMA * torch.randn(20000, 3, dtype=torch.float64)

    def mean_loss(model):
        return transport.training_losses(model, x, generator=torch.Generator().manual_seed(0))["loss"].mean()

    best = mean_loss(exact)
    for factor in (0.95, 1.05):
        assert best < mean_loss(lambda x_t, t, f=factor: exact(x_t, t) * f), factor


def test_learnable_schedule_receives_gradients():
    class Learned(schedules.Custom):
        def __init__(self):
            super().__init__()
            self.power = torch.nn.Parameter(torch.tensor(1.5))

        def alpha(self, t):
            return 1 - t**self.power

        def beta(self, t):
            return t

    schedule = Learned()
    transport = Transport(schedule)
    model = torch.nn.Linear(3, 3)
    out = transport.training_losses(lambda x_t, t: model(x_t), torch.randn(16, 3))
    out["loss"].mean().backward()
    assert schedule.power.grad is not None and schedule.power.grad.abs() > 0
    ref = Transport(schedule, fused=False).training_losses(lambda x_t, t: model(x_t), torch.randn(16, 3))
    assert ref["loss"].shape == (16,)


def test_official_model_time_adapter():
    """A model in the official convention (t = 1 data, velocity = data - noise)
    samples correctly through model_time="official"."""
    transport = Transport("linear", model_time="official")
    official = GaussianField(schedules.Linear(), "velocity", official=True)
    check_gaussian(transport.sample_ode(official, noise(), num_steps=50))


def test_eps_defaults():
    assert (Transport().train_eps, Transport().sample_eps) == (0.0, 0.0)
    assert (Transport("vp").train_eps, Transport("vp").sample_eps) == (1e-5, 1e-3)
    assert (Transport(prediction="noise").train_eps, Transport(prediction="noise").sample_eps) == (1e-3, 1e-3)
    # The official code leaves sample_eps as None when only train_eps is given.
    only_train = create_transport("VP", train_eps=1e-4)
    assert only_train.train_eps == 1e-4 and only_train.sample_eps == 1e-3
    assert Transport("vp").interval() == (1e-5, 1.0)
    assert Transport("linear", "score").interval(sample=True) == (1e-3, 1 - 1e-3)


def test_logit_normal_time_sampler():
    t = Transport(time_sampler="logit_normal").sample_time(10000, generator=torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1 and abs(t.mean().item() - 0.5) < 0.02 and t.std() < 0.25


def test_classifier_free_guidance_interval():
    class Labelled(torch.nn.Module):
        num_classes = 10

        def forward(self, x, t, y):
            return x + y.to(x.dtype)[:, None]

    transport = Transport()
    model = Labelled()
    y = torch.tensor([2, 3])
    guided = transport._guided(model, {"y": y}, 3.0, (0.5, 1.0), None)
    x = torch.zeros(2, 3)
    inside, outside = guided(x, torch.tensor([0.7, 0.7])), guided(x, torch.tensor([0.2, 0.2]))
    cond, uncond = y[:, None].float(), torch.full((2, 1), 10.0)
    torch.testing.assert_close(inside, (uncond + 3.0 * (cond - uncond)).expand(2, 3))
    torch.testing.assert_close(outside, cond.expand(2, 3))
    out = transport.sample_ode(model, torch.randn(2, 3), num_steps=4, model_kwargs={"y": y}, cfg_scale=2.0)
    assert out.shape == (2, 3)


def test_compiled_step():
    transport = Transport()
    model = GaussianField(transport.schedule, "velocity")
    eager = transport.sample_ode(model, noise(256), num_steps=10)
    compiled = transport.sample_ode(model, noise(256), num_steps=10, compile=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown path"):
        Transport("quadratic")
    with pytest.raises(ValueError, match="unknown prediction"):
        Transport(prediction="x0")
    with pytest.raises(ValueError, match="unknown loss_weight"):
        Transport(loss_weight="snr")
    with pytest.raises(ValueError, match="train_eps"):
        Transport(train_eps=0.7)
    with pytest.raises(ValueError, match="sample_eps"):
        Transport(sample_eps=-0.1)
    transport = Transport()
    with pytest.raises(ValueError, match="shape"):
        transport.training_losses(lambda x_t, t: x_t[:, :2], torch.randn(4, 3))
    model = GaussianField(transport.schedule, "velocity")
    with pytest.raises(ValueError, match="unknown diffusion_form"):
        transport.sample_sde(model, noise(4), diffusion_form="increasing_decreasing")
    with pytest.raises(ValueError, match="unknown last_step"):
        transport.sample_sde(model, noise(4), last_step="Median")
    with pytest.raises(ValueError, match="labels"):
        transport.sample_ode(model, noise(4), cfg_scale=2.0)


def test_misuse_that_would_give_a_wrong_number():
    """Settings that once ran and returned only the prior, NaN samples, or no
    guidance at all now name the argument."""
    transport = Transport()
    model = GaussianField(transport.schedule, "velocity")
    x = noise(8)
    with pytest.raises(ValueError, match="num_steps"):
        transport.log_likelihood(model, x, num_steps=0)
    with pytest.raises(ValueError, match="num_probes"):
        transport.log_likelihood(model, x, exact=False, num_probes=0)
    with pytest.raises(ValueError, match="diffusion_norm"):
        transport.sample_sde(model, x, num_steps=3, diffusion_norm=-1.0)
    for size in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="last_step_size"):
            transport.sample_sde(model, x, num_steps=3, last_step_size=size)
    for interval in ((0.8, 0.2), (0.0, 1.5), (0.5,)):
        with pytest.raises(ValueError, match="cfg_interval"):
            transport.sample_ode(model, x, num_steps=2, cfg_scale=2.0, cfg_interval=interval,
                                 model_kwargs={"y": torch.zeros(8, dtype=torch.long)}, null_label=1)


# ------------------------------------------- defects fixed in issue 13


def exact_flow(schedule, z, t_from, t_to, mu=MU, sigma=SIGMA):
    """The probability-flow map of N(mu, diag sigma^2) data from t_from to t_to: the
    standardised x_t, (x_t - alpha mu) / sqrt(alpha^2 sigma^2 + beta^2), is constant."""
    def mean_std(t):
        a, b, _, _ = schedule.coefficients(torch.tensor([t], dtype=torch.float64))
        return a * mu.double(), torch.sqrt(a**2 * sigma.double() ** 2 + b**2)

    (m0, s0), (m1, s1) = mean_std(t_from), mean_std(t_to)
    return m1 + s1 * (z.double() - m0) / s0


def rms(a, b):
    return (a.double() - b.double()).flatten(1).norm(dim=1).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("method,stages", [("rk4", 4), ("midpoint", 2), ("heun3", 3)])
def test_torchdiffeq_fixed_grid_methods_take_num_steps(method, stages):
    """Fixed-grid torchdiffeq methods step on the num_steps grid (they once took one
    step over [1, 0]), so they are at least as accurate as Heun with the same steps."""
    pytest.importorskip("torchdiffeq")
    transport = Transport("linear")
    model = GaussianField(transport.schedule, "velocity")
    z, calls = noise(2000, seed=4).double(), []
    out = transport.sample_ode(lambda x, t: calls.append(t) or model(x, t), z, method=method, num_steps=20)
    assert len(calls) == stages * 20
    exact = exact_flow(transport.schedule, z, 1.0, 0.0)
    assert rms(out, exact) <= rms(transport.sample_ode(model, z, method="heun", num_steps=20), exact)
    assert transport.sample_ode(model, z, method=method, num_steps=20, return_trajectory=True).shape[0] == 21


STIFF_SIGMA = torch.full((3,), 0.1)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_adaptive_solver_on_vp_with_stiff_data(prediction):
    """dopri5 probes times past the interval's end (down to t = -0.4), where VP's
    beta = sqrt(1 - alpha^2) is NaN (alpha > 1 for -0.01 < t < 0): it once died with
    "underflow in dt". The field is now held at the interval's ends there."""
    pytest.importorskip("torchdiffeq")
    transport = Transport("vp", prediction)
    model = GaussianField(transport.schedule, prediction, sigma=STIFF_SIGMA)
    lo, hi = transport.interval(sample=True)
    z, times = noise(2000), []
    out = transport.sample_ode(lambda x, t: times.append(t[0].item()) or model(x, t), z, method="dopri5",
                               atol=1e-8, rtol=1e-7)
    assert lo <= min(times) and max(times) <= hi
    # The global error of this solve is about 2e-6 (local tolerance 1e-7); Heun with 2000 steps gets 5e-6.
    assert rms(out, exact_flow(transport.schedule, z, hi, lo, sigma=STIFF_SIGMA)) < 1e-5


def test_vp_coefficients_are_held_at_the_ends_outside_the_unit_interval():
    vp = schedules.VP()
    outside, ends = torch.tensor([-0.5, -0.005, 1.5], dtype=torch.float64), torch.tensor([0.0, 0.0, 1.0])
    for got, want in zip(vp.coefficients(outside), vp.coefficients(ends.double())):
        torch.testing.assert_close(got, want)
    a, b, _, _ = vp.coefficients(outside)
    assert torch.isfinite(a).all() and torch.isfinite(b).all() and (a <= 1).all()


@pytest.mark.parametrize("path,form", [("cosine", f) for f in ("constant", "sigma", "linear", "decreasing",
                                                                 "increasing-decreasing")] + [("linear", "sigma")])
def test_sde_heun_ending_where_the_score_is_singular(path, form):
    """With last_step=None a velocity model's SDE ends at t = 0, where the score
    -E[eps | x_t] / beta divides by beta(0) = 0: stochastic Heun's correction there
    once made every sample NaN. The last step now skips it."""
    transport = Transport(path, "velocity")
    model = GaussianField(transport.schedule, "velocity")
    assert transport.interval(sample=True, sde=True, diffusion_form=form)[0] == 0.0
    out = transport.sample_sde(model, noise(10000), method="heun", num_steps=100, diffusion_form=form,
                               last_step=None, generator=torch.Generator().manual_seed(6))
    check_gaussian(out, mean_tol=0.06, var_rel_tol=0.1)


# ---------------------------------------------- bit-compatibility pin


def frozen_sample_ode(transport, model, x, num_steps, method):
    """sample_ode's fixed-grid loop as it was before issue 13 (uniform grid, Euler or Heun)."""
    lo, hi = transport.interval(sample=True)
    grid = torch.linspace(hi, lo, num_steps + 1, dtype=torch.float32)
    for i in range(num_steps):
        dt, batch = grid[i + 1] - grid[i], x.shape[0]
        d1 = transport.velocity(model(x, grid[i].expand(batch)), x, grid[i].expand(batch))
        x_euler = dt * d1 + x
        if method == "euler":
            x = x_euler
            continue
        t = grid[i + 1].expand(batch)
        d2 = transport.velocity(model(x_euler, t), x_euler, t)
        x = dt / 2 * (d1 + d2) + x
    return x


def frozen_sample_sde(transport, model, x, num_steps, method, form, last_step, gen, last_step_size=0.04):
    """sample_sde as it was before issue 13 (uniform grid, Euler-Maruyama or stochastic Heun)."""
    lo, hi = transport.interval(sample=True, sde=True, diffusion_form=form,
                                last_step_size=last_step_size if last_step else 0.0)
    grid, batch = torch.linspace(hi, lo, num_steps, dtype=torch.float32), x.shape[0]

    def drift(x, t):
        out = model(x, t)
        v, s = transport.velocity(out, x, t), transport.score(out, x, t)
        return -v + schedules.per_sample(transport.diffusion(t, form), x) * s, v, s

    for i in range(num_steps - 1):
        z = torch.randn(x.shape, dtype=x.dtype, generator=gen)
        h, t = grid[i] - grid[i + 1], grid[i].expand(batch)
        noise_term = schedules.per_sample(torch.sqrt(2 * transport.diffusion(t, form) * h), x) * z
        if method == "euler":
            x = x + drift(x, t)[0] * h + noise_term
        else:
            x_hat = x + noise_term
            k1 = drift(x_hat, t)[0]
            k2 = drift(x_hat + h * k1, grid[i + 1].expand(batch))[0]
            x = x_hat + h / 2 * (k1 + k2)
    if last_step is not None:
        t = grid[-1].expand(batch)
        d, v, s = drift(x, t)
        x = {"Mean": lambda: x + d * last_step_size, "Euler": lambda: x - v * last_step_size,
             "Tweedie": lambda: transport.schedule.expected_data(s, x, t)}[last_step]()
    return x


@pytest.mark.parametrize("path,prediction", [("linear", "velocity"), ("vp", "noise"), ("cosine", "score")])
def test_default_samplers_are_bit_identical_to_the_frozen_loops(path, prediction):
    """The official settings (uniform grid; Euler, Heun; Euler-Maruyama, stochastic
    Heun; every last step) give the same bits as before issue 13."""
    transport = Transport(path, prediction)
    model = GaussianField(transport.schedule, prediction)
    z = noise(64, seed=7)
    for method in ("euler", "heun"):
        assert torch.equal(transport.sample_ode(model, z, method=method, num_steps=12),
                           frozen_sample_ode(transport, model, z, 12, method))
    for method, form, last_step in [("euler", "sigma", "Mean"), ("heun", "SBDM", None), ("euler", "linear", "Tweedie"),
                                    ("heun", "constant", "Euler")]:
        got = transport.sample_sde(model, z, method=method, num_steps=12, diffusion_form=form, last_step=last_step,
                                   generator=torch.Generator().manual_seed(8))
        want = frozen_sample_sde(transport, model, z, 12, method, form, last_step, torch.Generator().manual_seed(8))
        assert torch.equal(got, want), (method, form, last_step)
