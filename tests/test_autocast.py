"""bf16 autocast, the configuration everybody trains in on a GPU, run on the
CPU: a training step and sampling runs through the transport, for the image
and the vector model, fused and unfused, every path x prediction. Fused and
unfused must agree within bf16 tolerance, with finite gradients."""

import copy

import pytest
import torch
from helpers import randomize_zero_init

import sit_ext
from sit_ext.models import SiT
from sit_ext.transport import Transport

PATHS = ["linear", "cosine", "vp"]
PREDICTIONS = ["velocity", "noise", "score"]
SWITCHES = ["fuse_mlp", "batch_adaln"]  # the model's optional fused paths, off by default


def model_and_data(kind):
    torch.manual_seed(0)
    if kind == "image":
        model = SiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                    num_classes=10, learn_sigma=False)
        x, kwargs = torch.randn(6, 4, 8, 8), {"y": torch.randint(0, 10, (6,))}
    else:
        model = sit_ext.build(5, hidden_size=32, num_layers=2, num_heads=4)
        x, kwargs = torch.randn(6, 3, 5), {}
    return randomize_zero_init(model), x, kwargs


def rel_diff(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def training_step(base, x, kwargs, path, prediction, fused, autocast, switches=()):
    """The loss and every parameter's gradient ({name: grad}) of one step;
    `switches` names the model's optional fused paths to turn on."""
    model = copy.deepcopy(base).train()
    model.fused = fused
    for switch in switches:
        setattr(model, switch, True)
    transport = Transport(path, prediction, fused=fused)
    torch.manual_seed(1)  # the same label dropout for every run
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = transport.training_losses(model, x, kwargs, generator=torch.Generator().manual_seed(2))
    assert out["loss"].dtype == torch.float32
    assert out["pred"].dtype == (torch.bfloat16 if autocast else torch.float32)
    loss = out["loss"].mean()
    loss.backward()
    assert torch.isfinite(loss)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() and g.dtype == torch.float32 for g in grads.values())
    return loss.detach(), grads


@pytest.mark.parametrize("kind", ["image", "vector"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_training_step(kind, path, prediction):
    """Fused bf16 against float32 (unfused, no autocast), per parameter: the
    error may be at most 2x unfused bf16's own, plus bf16's unit roundoff
    (2^-8) of the parameter's gradient norm."""
    check_training_step(kind, path, prediction)


@pytest.mark.parametrize("kind", ["image", "vector"])
@pytest.mark.parametrize("path", ["linear", "vp"])
@pytest.mark.parametrize("switch", SWITCHES)
def test_training_step_with_an_optional_path(kind, path, switch):
    """The same bound with fuse_mlp (fc1, GELU, fc2 as one gelu_mlp op, which
    autocast casts through its Autocast kernel) or batch_adaln (one GEMM for
    every modulation) on."""
    check_training_step(kind, path, "velocity", (switch,))


def check_training_step(kind, path, prediction, switches=()):
    base, x, kwargs = model_and_data(kind)
    loss_f, grads_f = training_step(base, x, kwargs, path, prediction, True, True, switches)
    loss_u, grads_u = training_step(base, x, kwargs, path, prediction, False, True)
    loss_r, grads_r = training_step(base, x, kwargs, path, prediction, False, False)
    assert (loss_f - loss_r).abs() <= 2 * (loss_u - loss_r).abs() + 2**-8 * loss_r.abs()
    assert grads_f.keys() == grads_u.keys() == grads_r.keys()
    for name, ref in grads_r.items():
        err, eager_err = (grads_f[name] - ref).norm(), (grads_u[name] - ref).norm()
        assert err <= 2 * eager_err + 2**-8 * ref.norm(), f"{name}: {err:.3e} > 2 x {eager_err:.3e}"


@pytest.mark.parametrize("kind", ["image", "vector"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_sampling(kind, path, prediction):
    """ODE and SDE samples, fused bf16 against float32 (unfused, no autocast,
    the same noise): the error may be at most 2x unfused bf16's own (measured:
    at most 0.99x), plus 2^-16 of the samples' norm as a floor. (bf16's unit
    roundoff, 2^-8, of the norm would let a dropped proj/fc2 bias through.)"""
    check_sampling(kind, path, prediction)


@pytest.mark.parametrize("kind", ["image", "vector"])
@pytest.mark.parametrize("path", ["linear", "vp"])
@pytest.mark.parametrize("switch", SWITCHES)
def test_sampling_with_an_optional_path(kind, path, switch):
    check_sampling(kind, path, "velocity", (switch,))


def check_sampling(kind, path, prediction, switches=()):
    base, x, kwargs = model_and_data(kind)
    base.eval()
    z = torch.randn_like(x)
    samples = {}
    for fused, autocast in ((True, True), (False, True), (False, False)):
        model = copy.deepcopy(base)
        model.fused = fused
        for switch in switches if fused else ():
            setattr(model, switch, True)
        transport = Transport(path, prediction, fused=fused)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            ode = transport.sample_ode(model, z, num_steps=4, model_kwargs=kwargs)
            sde = transport.sample_sde(model, z, num_steps=4, model_kwargs=kwargs,
                                       generator=torch.Generator().manual_seed(3))
        assert torch.isfinite(ode).all() and torch.isfinite(sde).all()
        samples[fused, autocast] = ode, sde
    for name, f, u, r in zip(("ode", "sde"), samples[True, True], samples[False, True], samples[False, False]):
        err, eager_err = (f.float() - r).norm(), (u.float() - r).norm()
        assert err <= 2 * eager_err + 2**-16 * r.norm(), f"{name}: {err:.3e} > 2 x {eager_err:.3e}"


@pytest.mark.parametrize("kind", ["image", "vector"])
def test_samples_come_back_in_the_noise_dtype(kind):
    """float16 noise under bfloat16 autocast, with guidance: every method returns
    float16 samples and trajectories (rk4 gave float16 but Euler, Heun and Adams
    float32, and trajectories and guidance failed in autocast's stack and cat)."""
    base, x, kwargs = model_and_data(kind)
    model = base.eval()
    z = torch.randn_like(x).half()
    transport = Transport()
    pytest.importorskip("torchdiffeq")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = transport.sample_ode(model, z.float(), num_steps=4, model_kwargs=kwargs)
        for method in ("euler", "heun", "adams", "rk4"):
            for trajectory in (False, True):
                out = transport.sample_ode(model, z, method=method, num_steps=4, model_kwargs=kwargs,
                                           return_trajectory=trajectory, cfg_scale=1.5 if kwargs else 1.0)
                assert out.dtype == torch.float16 and torch.isfinite(out).all(), (method, trajectory)
                assert out.shape == ((5, *x.shape) if trajectory else x.shape)
            if method == "heun":
                plain = transport.sample_ode(model, z, num_steps=4, model_kwargs=kwargs)
                assert rel_diff(plain, reference) < 5e-2
        for method in ("euler", "heun"):
            out = transport.sample_sde(model, z, method=method, num_steps=4, model_kwargs=kwargs,
                                       return_trajectory=True, generator=torch.Generator().manual_seed(0))
            assert out.dtype == torch.float16 and out.shape == (5, *x.shape) and torch.isfinite(out).all()
