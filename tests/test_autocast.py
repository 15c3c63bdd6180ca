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


@pytest.mark.parametrize("kind", ["image", "vector"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_training_step(kind, path, prediction):
    base, x, kwargs = model_and_data(kind)
    results = {}
    for fused in (True, False):
        model = copy.deepcopy(base).train()
        model.fused = fused
        transport = Transport(path, prediction, fused=fused)
        torch.manual_seed(1)  # the same label dropout for both
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = transport.training_losses(model, x, kwargs, generator=torch.Generator().manual_seed(2))
        assert out["pred"].dtype == torch.bfloat16 and out["loss"].dtype == torch.float32
        loss = out["loss"].mean()
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        assert torch.isfinite(loss) and torch.isfinite(grads).all()
        assert all(p.grad is None or p.grad.dtype == p.dtype for p in model.parameters())
        results[fused] = loss.detach(), grads
    (loss_f, grads_f), (loss_u, grads_u) = results[True], results[False]
    assert rel_diff(loss_f, loss_u) < 2e-2
    assert rel_diff(grads_f, grads_u) < 5e-2


@pytest.mark.parametrize("kind", ["image", "vector"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_sampling(kind, path, prediction):
    base, x, kwargs = model_and_data(kind)
    base.eval()
    z = torch.randn_like(x)
    samples = {}
    for fused in (True, False):
        model = copy.deepcopy(base)
        model.fused = fused
        transport = Transport(path, prediction, fused=fused)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            ode = transport.sample_ode(model, z, num_steps=4, model_kwargs=kwargs)
            sde = transport.sample_sde(model, z, num_steps=4, model_kwargs=kwargs,
                                       generator=torch.Generator().manual_seed(3))
        assert torch.isfinite(ode).all() and torch.isfinite(sde).all()
        samples[fused] = ode, sde
    for a, b in zip(samples[True], samples[False]):
        assert rel_diff(a, b) < 5e-2


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
