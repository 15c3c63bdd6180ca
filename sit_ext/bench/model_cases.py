"""The SiT model cases: the train step and the guided sampling step of a
preset, {fused, unfused} x {eager, torch.compile, CUDA graph}, with the
analytic FLOP count and the datasheet peaks that MFU is taken against."""

from __future__ import annotations

from collections.abc import Callable

import torch

# Comparisons, not candidates for the best fused variant (they are not the defaults): "fused-nofold",
# fused eager with fold_biases off (attn.proj and mlp.fc2 add their own biases), shows what folding them
# into the fused residual gives; "fused-mlp", fused eager with fuse_mlp on (fc1, GELU and fc2 as one
# gelu_mlp op, cuBLASLt epilogues on CUDA), whether that op pays; "fused-batchadaln", fused eager with
# batch_adaln on (every adaLN modulation in one GEMM on the concatenated weights), whether that pays.
COMPARISONS = ("fused-nofold", "fused-mlp", "fused-batchadaln")
MODEL_VARIANTS = ("fused", *COMPARISONS, "unfused", "fused+compile", "unfused+compile", "fused+graph",
                  "unfused+graph")
MODEL_MODES = ("train step", "guided sample step")
CFG_SCALE = 4.0

# Dense (no sparsity) bf16 tensor-core peaks from the datasheets, TFLOP/s; the
# first name found in the device's name applies.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0))


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def sit_forward_flops(model, batch: int) -> float:
    """Multiply-add FLOPs (2 each) of one SiT forward on `batch` images: every
    Linear on the tokens (qkv, proj, fc1, fc2, the final layer), the patch
    embedding, attention's scores and values (4 B T^2 D a block), and the
    per-sample Linears (adaLN modulation, time and label embedding)."""
    tokens = model.pos_embed.shape[1]
    per_token = sum(m.in_features * m.out_features for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear)
                    and (name.startswith("blocks.") and "adaLN" not in name or name == "final_layer.linear"))
    per_sample = sum(m.in_features * m.out_features for name, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and ("adaLN" in name or "t_embedder" in name))
    embed = model.x_embedder.proj.weight.numel()  # [D, C, p, p]: one multiply-add per weight and token
    attention = 2 * tokens * model.blocks[0].attn.qkv.in_features * len(model.blocks)
    return 2.0 * batch * (tokens * (per_token + embed + attention) + per_sample)


def model_step_flops(model, mode: str, batch: int) -> float:
    """A train step is forward + backward (3 forwards); a guided sampling step
    runs the model on both halves (2 B)."""
    return 3 * sit_forward_flops(model, batch) if mode == "train step" else sit_forward_flops(model, 2 * batch)


class _ModelRig:
    """One SiT preset with its AdamW (and torch.compile wrapper), shared by
    every variant and batch: the variants differ only in model.fused, the
    runner they call and (+graph) one CUDA graph per step."""

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype, compile_: bool):
        from ..models import SiT_models

        torch.manual_seed(0)
        self.device, self.dtype = device, dtype
        self.model = SiT_models[name]().to(device)
        if dtype != torch.float32 and device.type == "cpu":
            self.model = self.model.to(dtype)  # CPU: plain low-precision weights
        # fused AdamW (one kernel per step, capturable) where torch has it, for every variant alike
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0, fused=True)
        self.compiled = torch.compile(self.model, dynamic=False) if compile_ else None

    def cases(self, batch: int) -> list[tuple[str, dict[str, Callable[[], Callable[[], object]]]]]:
        """[(mode, {variant: build() -> step()})]: a graph variant captures
        when built, so that the harness can free one before the next."""
        from ..cuda_graphs import CapturedTrainStep, StaticGraph
        from ..transport import Transport

        device, dtype, model, optimizer = self.device, self.dtype, self.model, self.optimizer
        x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, device=device)
        y = torch.randint(0, model.num_classes, (batch,), device=device)
        noise = torch.randn_like(x)
        t = torch.full((batch,), 0.5, device=device)
        both_y = torch.cat([y, torch.full_like(y, model.num_classes)])
        cuda = device.type == "cuda"
        lowp = dtype != torch.float32
        if lowp and not cuda:
            x, noise = x.to(dtype), noise.to(dtype)

        def autocast():  # no cast cache: the graph variants cast inside the graph
            return torch.autocast(device.type, dtype=dtype, enabled=lowp and cuda, cache_enabled=False)

        train, sample = {}, {}
        for variant in MODEL_VARIANTS:
            if "compile" in variant and self.compiled is None or "graph" in variant and not cuda:
                continue
            runner = self.compiled if "compile" in variant else model
            fused = variant.startswith("fused")
            switches = dict(fold_biases=variant != "fused-nofold", fuse_mlp=variant == "fused-mlp",
                            batch_adaln=variant == "fused-batchadaln")
            transport = Transport("linear", fused=fused)

            def setup(fused=fused, switches=switches):
                model.fused = fused
                for name, value in switches.items():
                    setattr(model, name, value)

            def losses(x, y, runner=runner, transport=transport, setup=setup):
                setup()
                model.train()
                with autocast():
                    return transport.training_losses(runner, x, model_kwargs={"y": y})["loss"].mean()

            def sample_step(z, runner=runner, setup=setup):
                setup()
                model.eval()
                with torch.no_grad(), autocast():
                    out = runner(z.repeat(2, 1, 1, 1), t.repeat(2), both_y)
                    cond, uncond = out[:, :model.in_channels].float().chunk(2)
                    return z - 0.02 * (uncond + CFG_SCALE * (cond - uncond))

            if "graph" in variant:
                def train_build(losses=losses):
                    step = CapturedTrainStep(losses, list(model.parameters()), optimizer, (x, y),
                                             what="graph variant")
                    return lambda: step(x, y)

                def sample_build(sample_step=sample_step):
                    graph = StaticGraph(sample_step, (noise,), "graph variant")
                    return lambda: graph(noise)
            else:
                def train_build(losses=losses):
                    def step():
                        loss = losses(x, y)
                        optimizer.zero_grad(set_to_none=True)  # never into a graph variant's gradients
                        loss.backward()
                        optimizer.step()
                    return step

                def sample_build(sample_step=sample_step):
                    return lambda: sample_step(noise)
            train[variant], sample[variant] = train_build, sample_build
        return [("train step", train), ("guided sample step", sample)]


def model_cases(name: str, batch: int, device: torch.device, dtype: torch.dtype,
                compile_: bool = True) -> list[tuple[str, dict[str, Callable[[], Callable[[], object]]]]]:
    """A training step (interpolant, forward, velocity loss, backward, AdamW)
    and a guided sampling step (both halves in one batch, then an Euler step)
    of a SiT preset, {fused, unfused} x {eager, torch.compile, CUDA graph}.
    bfloat16 on CUDA runs under autocast with float32 weights."""
    return _ModelRig(name, device, dtype, compile_).cases(batch)
