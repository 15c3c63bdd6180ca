"""sit_ext.SiT: both front doors, fused against unfused, official names and
shapes, presets, loading, CFG, compile and bad input."""

import os
import pickle

import numpy as np
import pytest
import torch
from helpers import randomize_zero_init

import sit_ext
from sit_ext.models import SiT, SiT_models, get_2d_sincos_pos_embed


def image_model(**kw):
    kw = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4,
              num_classes=10) | kw
    return randomize_zero_init(SiT(**kw)).eval()


def vector_model(**kw):
    return randomize_zero_init(sit_ext.build(6, hidden_size=32, num_layers=2, num_heads=4, **kw)).eval()


def both_paths(model, *args, **kwargs):
    model.fused = True
    fused = model(*args, **kwargs)
    model.fused = False
    unfused = model(*args, **kwargs)
    model.fused = True
    return fused, unfused


@pytest.mark.parametrize("classes", [10, None], ids=["classes", "no-classes"])
def test_image_fused_matches_unfused(device, classes):
    model = image_model(num_classes=classes).to(device)
    x, t = torch.randn(3, 4, 8, 8, device=device), torch.rand(3, device=device)
    y = torch.tensor([1, 5, 9], device=device) if classes else None
    fused, unfused = both_paths(model, x, t, y)
    assert fused.shape == (3, 4, 8, 8)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("classes", [7, None], ids=["classes", "no-classes"])
@pytest.mark.parametrize("shape", [(5, 6), (5, 3, 6)], ids=["[B,D]", "[B,L,D]"])
def test_vector_fused_matches_unfused(device, classes, shape):
    model = vector_model(num_classes=classes).to(device)
    x, t = torch.randn(shape, device=device), torch.rand(5, device=device)
    y = torch.randint(0, 7, (5,), device=device) if classes else None
    fused, unfused = both_paths(model, x, t, y)
    assert fused.shape == shape == unfused.shape
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    assert sit_ext.output_size(6) == fused.shape[-1]


def test_gradients_match(device):
    model = image_model().to(device).train()
    x, t, y = torch.randn(2, 4, 8, 8, device=device), torch.rand(2, device=device), torch.tensor([3, 4],
                                                                                                  device=device)
    grads = []
    for fused in (True, False):
        model.fused = fused
        model.zero_grad()
        torch.manual_seed(0)  # the same label dropout in both passes
        model(x, t, y).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def exact_output(model, x, t, y):
    """The float64 reference through the unfused path (plain PyTorch), so that a
    formula bug in the fused path cannot move the reference with it. Leaves the
    model float64 and fused."""
    model.double().fused = False
    exact = model(x.double(), t.double(), y)
    model.fused = True
    return exact


def assert_within_eager_bound(fused, unfused, exact, atol=1e-3):
    """|fused - exact| <= 2 |unfused - exact| + atol (max over elements)."""
    err = (fused.double() - exact).abs().max().item()
    eager_err = (unfused.double() - exact).abs().max().item()
    assert err <= 2 * eager_err + atol, (err, eager_err)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_within_eager_bound(device, dtype):
    """In low precision, fused is no further from float64 than twice what the
    unfused eager path achieves."""
    model = image_model().to(device)
    x, t, y = torch.randn(2, 4, 8, 8, device=device), torch.rand(2, device=device), torch.tensor([1, 2],
                                                                                                  device=device)
    exact = exact_output(model, x, t, y)
    model.to(dtype)
    fused, unfused = both_paths(model, x.to(dtype), t, y)
    assert_within_eager_bound(fused, unfused, exact)


def test_block_alone_matches_unfused(device):
    """A block called on its own (ln_modulate, gated_residual_ln_modulate, gated_residual)."""
    model = image_model().to(device)
    x, c = torch.randn(2, 16, 64, device=device), torch.randn(2, 64, device=device)
    torch.testing.assert_close(model.blocks[1](x, c), model.blocks[1](x, c, fused=False), rtol=1e-5, atol=1e-5)


def test_state_dict_names_and_shapes():
    sd = SiT_models["SiT-S/2"]().state_dict()
    assert len(sd) == 132
    expected = {
        "pos_embed": (1, 256, 384), "x_embedder.proj.weight": (384, 4, 2, 2), "x_embedder.proj.bias": (384,),
        "t_embedder.mlp.0.weight": (384, 256), "t_embedder.mlp.0.bias": (384,),
        "t_embedder.mlp.2.weight": (384, 384), "t_embedder.mlp.2.bias": (384,),
        "y_embedder.embedding_table.weight": (1001, 384),
        "final_layer.linear.weight": (32, 384), "final_layer.linear.bias": (32,),
        "final_layer.adaLN_modulation.1.weight": (768, 384), "final_layer.adaLN_modulation.1.bias": (768,),
    }
    for i in range(12):
        expected |= {
            f"blocks.{i}.attn.qkv.weight": (1152, 384), f"blocks.{i}.attn.qkv.bias": (1152,),
            f"blocks.{i}.attn.proj.weight": (384, 384), f"blocks.{i}.attn.proj.bias": (384,),
            f"blocks.{i}.mlp.fc1.weight": (1536, 384), f"blocks.{i}.mlp.fc1.bias": (1536,),
            f"blocks.{i}.mlp.fc2.weight": (384, 1536), f"blocks.{i}.mlp.fc2.bias": (384,),
            f"blocks.{i}.adaLN_modulation.1.weight": (2304, 384), f"blocks.{i}.adaLN_modulation.1.bias": (2304,),
        }
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert not sd["pos_embed"].requires_grad


def test_presets_on_meta_device():
    counts = {"S": 33e6, "B": 130e6, "L": 458e6, "XL": 675e6}
    assert len(SiT_models) == 12
    with torch.device("meta"):
        for name, make in SiT_models.items():
            model = make()
            size, patch = name.removeprefix("SiT-").split("/")
            n = sum(p.numel() for p in model.parameters())
            if patch == "2":
                assert abs(n - counts[size]) / counts[size] < 0.01, (name, n)
            assert model.patch_size == int(patch) and model.depth == {"S": 12, "B": 12, "L": 24, "XL": 28}[size]


def official_pos_embed(embed_dim, grid_size):
    """The official numpy implementation (DiT/SiT models.py), for comparison."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64)
        omega /= dim / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def test_pos_embed_matches_official():
    np.testing.assert_allclose(get_2d_sincos_pos_embed(384, 16).numpy(), official_pos_embed(384, 16), atol=1e-12)


def test_initialisation():
    model = SiT(input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    for block in model.blocks:
        assert block.adaLN_modulation[1].weight.abs().sum() == 0
    assert model.final_layer.linear.weight.abs().sum() == 0
    assert abs(model.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.005
    assert model.blocks[0].attn.qkv.bias.abs().sum() == 0
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    assert model(x, t, torch.tensor([0, 1])).abs().sum() == 0  # zero final layer


def test_save_reload_and_mismatch(tmp_path):
    model = image_model(input_size=32, hidden_size=384, depth=12, num_heads=6, num_classes=1000)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "steps": 5}, path)
    loaded = SiT.from_pretrained(path, model="SiT-S/2").eval()
    x, t, y = torch.randn(2, 4, 32, 32), torch.rand(2), torch.tensor([3, 999])
    torch.testing.assert_close(loaded(x, t, y), model(x, t, y))
    from_dict = SiT.from_pretrained(model.state_dict(), model="SiT-S/2")
    torch.testing.assert_close(from_dict.pos_embed, model.pos_embed)
    with pytest.raises(ValueError, match="shape conflicts") as info:
        SiT.from_pretrained(path, model="SiT-S/2", num_classes=10)
    assert "y_embedder.embedding_table.weight" in str(info.value)
    with pytest.raises(ValueError, match="missing keys"):
        SiT.from_pretrained(path, model="SiT-S/2", depth=13)  # a block more than the file has
    with pytest.raises(ValueError, match="unknown model"):
        SiT.from_pretrained(path, model="SiT-M/2")


class _Exploit:
    """Unpickling this would create a file: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_never_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Exploit(str(marker))}, f)
    with pytest.raises(ValueError, match="refusing to load"):
        SiT.from_pretrained(path, model="SiT-S/2")
    assert not marker.exists()
    bad = tmp_path / "evil2.pt"
    torch.save({"ema": {"w": torch.zeros(1)}, "obj": _Exploit(str(marker))}, bad)
    with pytest.raises(ValueError, match="refusing to load"):
        SiT.from_pretrained(bad, model="SiT-S/2")
    assert not marker.exists()


@pytest.mark.parametrize("channels", [None, 3], ids=["all-channels", "official-3"])
def test_forward_with_cfg(device, channels):
    model = image_model().to(device)
    x = torch.randn(2, 4, 8, 8, device=device)
    x = torch.cat([x, x])
    t = torch.rand(1, device=device).repeat(4)
    y = torch.tensor([1, 2, 10, 10], device=device)  # 10 = the null class
    out = model.forward_with_cfg(x, t, y, cfg_scale=4.0, cfg_channels=channels)
    cond, uncond = model(x, t, y).chunk(2)
    k = 4 if channels is None else channels
    want = uncond[:, :k] + 4.0 * (cond[:, :k] - uncond[:, :k])
    torch.testing.assert_close(out[:2, :k], want)
    torch.testing.assert_close(out[2:, :k], want)
    torch.testing.assert_close(out[:, k:], model(x, t, y)[:, k:])


@pytest.mark.parametrize("switch", [None, "fuse_mlp", "batch_adaln"])
def test_compile_fullgraph(device, switch):
    """Compiled without graph breaks, by default and with each optional fused path on."""
    torch._dynamo.reset()
    model = image_model().to(device).train()
    if switch:
        setattr(model, switch, True)
    model.y_embedder.dropout_prob = 0.0  # compiled code draws other random numbers than eager
    x, t, y = torch.randn(2, 4, 8, 8, device=device), torch.rand(2, device=device), torch.tensor([3, 4],
                                                                                                  device=device)
    compiled = torch.compile(model, fullgraph=True)
    got = compiled(x, t, y)
    got.square().mean().backward()
    want = model(x, t, y)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    model.eval()
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x, t, y), model(x, t, y), rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("kwargs, name", [({"depth": -1}, "depth"), ({"depth": 0}, "depth"),
                                          ({"class_dropout_prob": 1.5}, "class_dropout_prob"),
                                          ({"num_classes": -3}, "num_classes"), ({"num_heads": 0}, "num_heads"),
                                          ({"hidden_size": 0}, "hidden_size")])
def test_bad_constructor_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SiT(**(dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4) | kwargs))


def test_forward_with_cfg_bad_input():
    model = image_model()
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4), torch.tensor([1, 2, 10, 10])
    with pytest.raises(ValueError, match="cfg_channels"):
        model.forward_with_cfg(x, t, y, 2.0, cfg_channels=9)
    with pytest.raises(ValueError, match="even batch"):
        model.forward_with_cfg(x[:3], t[:3], y[:3], 2.0)


def test_bad_input():
    model = image_model()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"\[N, 4, 8, 8\]"):
        model(torch.randn(2, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match=r"\[N, 4, 8, 8\]"):
        model(torch.randn(2, 4, 16, 16), t, y)
    with pytest.raises(ValueError, match="pass y"):
        model(x, t)
    with pytest.raises(RuntimeError, match="labels must be in"):
        model(x, t, torch.tensor([1, 11]))
    with pytest.raises(RuntimeError, match="labels must be in"):
        model(x, t, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="t of shape"):
        model(x, torch.rand(3), y)
    vec = vector_model()
    with pytest.raises(ValueError, match=r"\[B, 6\]"):
        vec(torch.randn(2, 5), t)
    with pytest.raises(ValueError, match="no classes"):
        vec(torch.randn(2, 6), t, y)
    with pytest.raises(ValueError, match="max_seq_len"):
        sit_ext.build(6, max_seq_len=4)(torch.randn(2, 5, 6), t)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graph_and_autocast():
    model = image_model().cuda()
    x, t, y = torch.randn(2, 4, 8, 8, device="cuda"), torch.rand(2, device="cuda"), torch.tensor([3, 4],
                                                                                                  device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused, unfused = both_paths(model, x, t, y)
    assert_within_eager_bound(fused, unfused, exact_output(model, x, t, y))
    model.float()
    static = [x.clone(), t.clone(), y.clone()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        model(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = model(*static)
    static[0].copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, model(*static))


def test_autocast_cpu_bf16():
    model = image_model()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([3, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, unfused = both_paths(model, x, t, y)
    assert fused.dtype == unfused.dtype
    assert_within_eager_bound(fused, unfused, exact_output(model, x, t, y))


def test_autocast_with_a_float64_or_half_precision_stream():
    """Autocast casts float32 only: a float64 model under bf16 autocast stays
    float64 (fused refused it, naming an out_dtype the user never passed), and a
    float16 block under bf16 autocast gets bfloat16 modulation from its Linear
    (fused refused the mix; it now casts the [B, D] vectors to the stream's)."""
    model = image_model()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([3, 4])
    model.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, unfused = both_paths(model, x.double(), t.double(), y)
        cfg = model.forward_with_cfg(torch.cat([x, x]).double(), torch.cat([t, t]).double(),
                                     torch.tensor([3, 4, 10, 10]), 2.0)
    assert fused.dtype == unfused.dtype == cfg.dtype == torch.float64
    torch.testing.assert_close(fused, unfused, rtol=1e-10, atol=1e-10)
    block = model.blocks[0].half()
    h, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    exact = block.double()(h.double(), c.double(), fused=False)
    block.half()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, unfused = block(h.half(), c.half()), block(h.half(), c.half(), fused=False)
    assert fused.dtype == torch.float16
    err, eager_err = ((out.double() - exact).abs().max().item() for out in (fused, unfused))
    assert err <= 2 * eager_err + 1e-3, (err, eager_err)
    exact = exact_output(model, x, t, y)
    model.half()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, unfused = both_paths(model, x.half(), t.half(), y)
    assert_within_eager_bound(fused, unfused, exact)


def test_env_does_not_download():
    # from_pretrained takes local files only; a URL-like string is just a missing file.
    with pytest.raises((FileNotFoundError, OSError)):
        SiT.from_pretrained(os.path.join("https://example.com", "SiT-XL-2-256x256.pt"))


def test_sampling_through_forward_with_cfg():
    """The official way to guide: the sampler calls model.forward_with_cfg on a
    doubled batch whose second half has null labels."""
    model = image_model()
    z = torch.randn(2, 4, 8, 8)
    z, y = torch.cat([z, z]), torch.tensor([1, 2, 10, 10])
    out = sit_ext.Transport().sample_ode(model.forward_with_cfg, z, num_steps=3,
                                         model_kwargs={"y": y, "cfg_scale": 3.0})
    assert out.shape == z.shape and torch.equal(out[:2], out[2:])


def _weight_casts(model, run):
    """The model's parameters that `run()` casts to a lower precision (data pointers)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    params = {p.data_ptr(): name for name, p in model.named_parameters()}
    seen = []

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in params:
                seen.append(params[args[0].data_ptr()])
            return func(*args, **kwargs)

    with Casts():
        run()
    return seen


@pytest.mark.parametrize("grad", [True, False], ids=["train", "sample"])
def test_autocast_casts_the_weights_once_per_region(grad):
    """Under one autocast region the fp32 -> bf16 weight casts happen once: the
    first forward casts every matmul weight, later forwards reuse them (the
    training loop holds one forward per optimizer step in its region; a
    sampler run in one region casts once per call, not once per evaluation)."""
    model = image_model()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randint(0, 10, (2,))
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        first = _weight_casts(model, lambda: model(x, t, y))
        second = _weight_casts(model, lambda: model(x, t, y))
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears <= set(first), sorted(linears - set(first))
    assert second == [], second


def test_fused_backbone_folds_the_output_biases(monkeypatch):
    """Every fused residual gets its branch's bias (attn.proj, mlp.fc2) to add
    itself, and the Linear no longer adds it: the gradient of each such bias is
    the fused backward's, and equals the unfused model's."""
    model = image_model()  # eval: no label dropout, so both paths see the same labels
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    calls = []
    grlm = sit_ext.ops.gated_residual_ln_modulate

    def spy(*args, bias=None, **kwargs):
        calls.append(bias)
        return grlm(*args, bias=bias, **kwargs)

    monkeypatch.setattr(sit_ext.models.ops, "gated_residual_ln_modulate", spy)
    fused, unfused = both_paths(model, x, t, y)
    folded = [p for b in model.blocks for p in (b.attn.proj.bias, b.mlp.fc2.bias)]
    assert len(calls) == len(folded) and all(c is p for c, p in zip(calls, folded))
    names = [n for n, _ in model.named_parameters() if n.endswith(("attn.proj.bias", "mlp.fc2.bias"))]
    params = [p for n, p in model.named_parameters() if n in names]
    got = torch.autograd.grad(fused.square().sum(), params)
    want = torch.autograd.grad(unfused.square().sum(), params)
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, msg=name)

    calls.clear()  # fold_biases off: the Linears add their own biases, with the same result
    model.fold_biases = False
    torch.testing.assert_close(model(x, t, y), fused)
    assert calls == [None] * len(folded)


class _Lora(torch.nn.Linear):
    """A Linear with a low-rank update, as adapter libraries wrap one."""

    def __init__(self, linear):
        super().__init__(linear.in_features, linear.out_features)
        self.load_state_dict(linear.state_dict())
        self.down = torch.nn.Parameter(torch.randn(2, linear.in_features))
        self.up = torch.nn.Parameter(torch.randn(linear.out_features, 2))

    def forward(self, x):
        return super().forward(x) + x @ self.down.T @ self.up.T


@pytest.mark.parametrize("change", ["hook", "subclass"])
def test_a_wrapped_or_hooked_projection_is_not_bypassed(change):
    """The fold calls F.linear on a plain nn.Linear's weight; a hooked Linear or
    a subclass (a LoRA wrapper) runs as it is, so fused still equals unfused."""
    model = image_model()
    for block in model.blocks:
        if change == "hook":
            block.mlp.fc2.register_forward_hook(lambda m, i, out: out * 1.5)
        else:
            block.attn.proj = _Lora(block.attn.proj)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    fused, unfused = both_paths(model, x, t, y)
    plain = image_model()
    plain.load_state_dict(model.state_dict(), strict=False)
    assert not torch.allclose(unfused, plain(x, t, y), atol=1e-3)  # the change matters
    torch.testing.assert_close(fused, unfused, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("fold", [True, False], ids=["fold", "no-fold"])
def test_fused_mlp_matches_unfused(device, fold):
    """fuse_mlp runs each block's fc1, GELU and fc2 as one gelu_mlp op: the
    output and every parameter's gradient equal the unfused model's."""
    model = image_model().to(device)
    model.fuse_mlp, model.fold_biases = True, fold
    x, t, y = torch.randn(2, 4, 8, 8, device=device), torch.rand(2, device=device), torch.tensor([3, 4],
                                                                                                  device=device)
    fused, unfused = both_paths(model, x, t, y)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(fused.square().sum(), params)
    want = torch.autograd.grad(unfused.square().sum(), params)
    for (name, _), g, w in zip(((n, p) for n, p in model.named_parameters() if p.requires_grad), got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_mlp_runs_one_op_per_block(monkeypatch):
    """With fuse_mlp, each block's MLP is one gelu_mlp call on that block's
    fc1 and fc2 weights (fc2's bias folded into the residual); a hooked or
    wrapped fc1 runs as it is instead, and the result is still unfused's."""
    model = image_model()
    model.fuse_mlp = True
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    calls = []
    real = sit_ext.ops.gelu_mlp

    def spy(x, w1, b1, w2, b2=None):
        calls.append((w1, b1, w2, b2))
        return real(x, w1, b1, w2, b2)

    monkeypatch.setattr(sit_ext.models.ops, "gelu_mlp", spy)
    model(x, t, y)
    want = [(b.mlp.fc1.weight, b.mlp.fc1.bias, b.mlp.fc2.weight, None) for b in model.blocks]
    assert len(calls) == len(want) and all(all(a is b for a, b in zip(c, w)) for c, w in zip(calls, want))
    calls.clear()
    model.blocks[0].mlp.fc1 = _Lora(model.blocks[0].mlp.fc1)
    model.blocks[1].mlp.act.register_forward_hook(lambda m, i, out: out * 1.5)
    fused, unfused = both_paths(model, x, t, y)
    assert len(calls) == len(model.blocks) - 2
    torch.testing.assert_close(fused, unfused, atol=2e-5, rtol=1e-4)


def test_batched_adaln_equals_per_block_in_float64(device):
    """batch_adaln makes every modulation in one GEMM: in float64 the vectors
    and every adaLN parameter's gradient equal the per-block Linears' (against
    the unfused model, which never batches)."""
    model = image_model().to(device).double()
    model.batch_adaln = True
    x, t, y = torch.randn(2, 4, 8, 8, device=device).double(), torch.rand(2, device=device).double(), \
        torch.tensor([3, 4], device=device)
    c = model._condition(x, t, y)
    batched = model._modulations(c)
    model.batch_adaln = False
    single = model._modulations(c)
    assert [len(m) for m in batched] == [6] * len(model.blocks) + [2]
    for got, want in zip(batched, single):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    model.batch_adaln = True
    fused, unfused = both_paths(model, x, t, y)
    torch.testing.assert_close(fused, unfused, rtol=1e-10, atol=1e-10)
    names = [n for n, _ in model.named_parameters() if "adaLN" in n]
    params = [p for n, p in model.named_parameters() if "adaLN" in n]
    got = torch.autograd.grad(fused.square().sum(), params)
    want = torch.autograd.grad(unfused.square().sum(), params)
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)


class _LinearCalls(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.out_features = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear:
            self.out_features.append(args[1].shape[0])
        return func(*args, **(kwargs or {}))


def test_batched_adaln_is_one_gemm_and_keeps_the_parameters():
    """One Linear call of width (6 depth + 2) D instead of one per block; the
    parameters, their names and the state dict are the per-block ones; a
    hooked adaLN layer turns the batching off (the hook runs), and the result
    is still unfused's."""
    model = image_model()
    keys = list(model.state_dict())
    model.batch_adaln = True
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    d, depth = model.hidden_size, len(model.blocks)
    with _LinearCalls() as calls:
        model(x, t, y)
    widths = calls.out_features
    assert widths.count((6 * depth + 2) * d) == 1 and 6 * d not in widths and 2 * d not in widths, widths
    assert list(model.state_dict()) == keys
    model.blocks[1].adaLN_modulation[1].register_forward_hook(lambda m, i, out: out * 0.5)
    with _LinearCalls() as calls:
        fused, unfused = both_paths(model, x, t, y)
    assert (6 * depth + 2) * d not in calls.out_features
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
