"""CUDA graphs: a fused bf16-autocast training step (forward, fused loss,
backward, AdamW) and a sampling step, captured once and replayed on new
inputs, give the numbers of the same steps run eagerly. The ops allocate
through the caching allocator, launch on the current stream and never sync
with the host, which is what capture needs."""

import copy

import pytest
import torch
from helpers import randomize_zero_init

from sit_ext import ops
from sit_ext.models import SiT

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def small_model():
    torch.manual_seed(0)
    model = SiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10,
                class_dropout_prob=0.0, learn_sigma=False)
    return randomize_zero_init(model).cuda()


def batch(seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(4, 4, 8, 8, device="cuda", generator=gen)
    noise = torch.randn(4, 4, 8, 8, device="cuda", generator=gen)
    t = torch.rand(4, device="cuda", generator=gen)
    y = torch.randint(0, 10, (4,), device="cuda", generator=gen)
    return x, noise, t, y


# Autocast's weight-cast cache must be off under capture (PyTorch's CUDA graph notes).
def autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)


def train_step(model, optimizer, x, noise, t, y):
    with autocast():
        x_t = ops.interpolant(x, noise, t, "linear", outputs=(True, False))[0]
        loss = ops.velocity_mse(model(x_t, t, y), x, noise, t, "linear")
    loss.backward()
    optimizer.step()
    return loss.detach()


def capture(fn, warmup=3):
    """Runs fn `warmup` times on a side stream, then captures it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def test_training_step_replays_like_eager():
    graphed = small_model().train()
    eager = copy.deepcopy(graphed)
    opt_g = torch.optim.AdamW(graphed.parameters(), lr=1e-3, capturable=True)
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-3, capturable=True)
    static = batch(0)

    def graphed_step():
        opt_g.zero_grad(set_to_none=False)
        return train_step(graphed, opt_g, *static)

    graph, static_loss = capture(graphed_step)
    for _ in range(3):  # the eager model takes the same warm-up steps
        opt_e.zero_grad(set_to_none=False)
        train_step(eager, opt_e, *static)
    for seed in (1, 2, 3):
        new = batch(seed)
        for s, v in zip(static, new):
            s.copy_(v)
        graph.replay()
        opt_e.zero_grad(set_to_none=False)
        loss = train_step(eager, opt_e, *new)
        torch.testing.assert_close(static_loss, loss)
    for pg, pe in zip(graphed.parameters(), eager.parameters()):
        torch.testing.assert_close(pg, pe)


def test_sampling_step_replays_like_eager():
    model = small_model().eval()
    x, _, t, y = batch(0)
    static_x = x.clone()

    def heun_step():
        with torch.no_grad(), autocast():
            v0 = model(static_x, t, y).float()
            v1 = model(static_x - 0.1 * v0, t - 0.1, y).float()
        return static_x - 0.05 * (v0 + v1)

    graph, static_out = capture(heun_step)
    for seed in (1, 2):
        static_x.copy_(batch(seed)[0])
        graph.replay()
        torch.testing.assert_close(static_out, heun_step())


# ------------------------------------------- train --cuda-graph, end to end


def _train(tmp_path, name, steps, resume=None, **given):
    from sit_ext.training import TrainConfig, train

    cfg = TrainConfig.for_data("moons", steps=steps, batch_size=64, hidden_size=32, depth=2, heads=2,
                               device="cuda", precision="bf16", out=str(tmp_path / name), ckpt_every=3,
                               log_every=1, grad_clip=0.5, **given)
    return train(cfg, resume=resume, progress=False, log=lambda line: None)


def _losses(run):
    import json

    with open(run["checkpoint"].replace("latest.pt", "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_train_cuda_graph_equals_eager(tmp_path):
    """--cuda-graph trains the same weights as eager training, step for step:
    the warm-up is undone (weights, AdamW state, random state) and the random
    times and noise are drawn inside the graph from the same generator."""
    eager = _train(tmp_path, "eager", 6)
    graphed = _train(tmp_path, "graphed", 6, cuda_graph=True)
    torch.testing.assert_close(_losses(graphed), _losses(eager))
    for (name, a), b in zip(graphed["model"].state_dict().items(), eager["model"].state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    for a, b in zip(graphed["ema"].state_dict().values(), eager["ema"].state_dict().values()):
        torch.testing.assert_close(a, b)


def test_train_cuda_graph_resumes_an_eager_run(tmp_path):
    """An eager checkpoint (AdamW state on the CPU, capturable off) continues
    under --cuda-graph as it would eagerly: the restored state is kept."""
    first = _train(tmp_path, "run", 3)
    graphed = _train(tmp_path, "run", 6, resume=first["checkpoint"], cuda_graph=True)
    eager = _train(tmp_path, "eager", 6)
    for a, b in zip(graphed["model"].state_dict().values(), eager["model"].state_dict().values()):
        torch.testing.assert_close(a, b)


def test_captured_step_refuses_a_new_shape():
    from sit_ext.cuda_graphs import StaticGraph

    graph = StaticGraph(lambda x: x * 2, [torch.randn(4, device="cuda")], "test graph")
    torch.testing.assert_close(graph(torch.ones(4, device="cuda")), torch.full((4,), 2.0, device="cuda"))
    with pytest.raises(ValueError, match="test graph: input 0 was captured as"):
        graph(torch.ones(5, device="cuda"))


# ------------------------------------ sample_ode / sample_sde(cuda_graph=True)


def _graph_sampling_cases():
    for method in ("euler", "heun", "adams"):
        yield "ode", method
    for method in ("euler", "heun"):
        yield "sde", method


@pytest.mark.parametrize("kind,method", list(_graph_sampling_cases()))
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_sampling_cuda_graph_equals_eager(kind, method, bf16):
    """A captured field, guidance included, gives the eager sampler's samples
    over several steps: each replay sees the new x and t, and the earlier
    velocities that Heun and Adams keep are not overwritten."""
    from sit_ext.transport import Transport

    model = small_model().eval()
    transport = Transport()
    noise, _, _, y = batch(5)
    kwargs = dict(model_kwargs={"y": y}, cfg_scale=3.0, cfg_interval=(0.0, 0.8), num_steps=6)
    run = transport.sample_ode if kind == "ode" else transport.sample_sde

    def sample(cuda_graph):
        extra = {} if kind == "ode" else {"generator": torch.Generator("cuda").manual_seed(1)}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            return run(model, noise, method=method, cuda_graph=cuda_graph, return_trajectory=True, **kwargs,
                       **extra)

    eager, graphed = sample(False), sample(True)
    assert not torch.equal(eager[1], eager[-1])  # the steps moved x
    torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
