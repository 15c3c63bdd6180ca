"""The ``sit-ext`` command (also ``python -m sit_ext``): info, train, sample,
bench and demo. Run ``sit-ext <command> --help`` for the options."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from . import data as data_lib
from ._build import build_info, format_build_info
from .training import CheckpointError, TrainConfig, load_checkpoint, load_weights, resolve_device

# ------------------------------------------------------------------- info


def cmd_info(args) -> int:
    print(format_build_info(build_info()))
    from .benchmark import _cpu_name

    print(f"cpu:              {_cpu_name()} ({torch.get_num_threads()} threads)")
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device:           {device} ({name})")
    return 0


# ------------------------------------------------------------------ train


def _add_train_args(p: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    g = p.add_argument_group("data and model")
    g.add_argument("--data", default=defaults.data,
                   help=f"{', '.join(data_lib.TOYS)}, digits, or a folder of .npy/.pt arrays")
    g.add_argument("--data-size", type=int, default=defaults.data_size, help="points drawn for a 2-D toy")
    g.add_argument("--model", default=defaults.model, help="'vector', or a preset such as SiT-S/2 for images")
    g.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    g.add_argument("--depth", type=int, default=defaults.depth)
    g.add_argument("--heads", type=int, default=defaults.heads)
    g.add_argument("--patch-size", type=int, default=defaults.patch_size)
    g.add_argument("--class-dropout-prob", type=float, default=defaults.class_dropout_prob)
    g = p.add_argument_group("path")
    g.add_argument("--path", default=defaults.path, help="linear, cosine (gvp) or vp")
    g.add_argument("--prediction", default=defaults.prediction, help="velocity, noise or score")
    g.add_argument("--loss-weight", default=defaults.loss_weight, help="velocity or likelihood (noise/score)")
    g.add_argument("--train-eps", type=float, default=defaults.train_eps)
    g.add_argument("--sample-eps", type=float, default=defaults.sample_eps)
    g.add_argument("--time-sampler", default=defaults.time_sampler, help="uniform or logit_normal")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=defaults.lr)
    g.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    g.add_argument("--batch-size", type=int, default=defaults.batch_size)
    g.add_argument("--steps", type=int, default=defaults.steps)
    g.add_argument("--grad-clip", type=float, default=defaults.grad_clip)
    g.add_argument("--ema-decay", type=float, default=defaults.ema_decay)
    g.add_argument("--precision", default=defaults.precision, choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    g.add_argument("--compile", action="store_true")
    g.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="fused kernels (default) or plain PyTorch")
    g.add_argument("--seed", type=int, default=defaults.seed)
    g.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:1, ...")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=defaults.out, help="run folder: latest.pt, log.jsonl, config.json")
    g.add_argument("--ckpt-every", type=int, default=defaults.ckpt_every)
    g.add_argument("--log-every", type=int, default=defaults.log_every)
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint (default: OUT/latest.pt)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _config(args) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})


def cmd_train(args) -> int:
    from .training import train

    cfg = _config(args)
    for name in ("steps", "batch_size", "ckpt_every", "log_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    resume = os.path.join(cfg.out, "latest.pt") if args.resume == "auto" else args.resume
    summary = train(cfg, resume=resume, progress=not args.quiet)
    if summary["rank"] == 0:
        print(f"trained {summary['steps']} steps, loss {summary['loss']:.4f}, "
              f"{summary['it_s']:.1f} it/s; checkpoint {summary['checkpoint']}")
    if summary["world"] > 1:
        torch.distributed.destroy_process_group()
    return 0


# ----------------------------------------------------------------- sample


def _sample_with(transport, model, shape, n, args, labels, device):
    """n samples in batches of args.batch_size, ODE or SDE as asked."""
    gen = torch.Generator(device).manual_seed(args.seed)
    out = []
    for start in range(0, n, args.batch_size):
        count = min(args.batch_size, n - start)
        z = torch.randn(count, *shape, device=device, generator=gen)
        kwargs = {"y": labels[start : start + count]} if labels is not None else None
        common = dict(model_kwargs=kwargs, cfg_scale=args.cfg_scale, cfg_interval=tuple(args.cfg_interval),
                      progress=not args.quiet)
        if args.method == "ode":
            x = transport.sample_ode(model, z, method=args.solver, num_steps=args.steps, atol=args.atol,
                                     rtol=args.rtol, **common)
        else:
            x = transport.sample_sde(model, z, method=args.solver if args.solver in ("euler", "heun") else "euler",
                                     num_steps=args.steps, diffusion_form=args.diffusion_form,
                                     diffusion_norm=args.diffusion_norm,
                                     last_step=None if args.last_step == "none" else args.last_step,
                                     last_step_size=args.last_step_size, generator=gen, **common)
        out.append(x.float().cpu())
    return torch.cat(out)


def _labels(args, num_classes, n, device):
    if not num_classes:
        if args.labels:
            raise ValueError("this model has no classes: drop --labels")
        return None
    if args.labels:
        bad = [c for c in args.labels if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"--labels must be in [0, {num_classes - 1}], got {bad}")
        return torch.tensor(args.labels, device=device).repeat(n // len(args.labels) + 1)[:n]
    return torch.arange(n, device=device) % num_classes


def write_samples(out_dir: str, samples: torch.Tensor, labels, kind: str, title: str,
                  reference: torch.Tensor | None = None, picture: torch.Tensor | None = None,
                  rows: int | None = None) -> list[str]:
    """samples.npz, and samples.png: a scatter plot for 2-D points, for images a
    grid of `picture` in `rows` rows (default: the first 64 samples)."""
    import numpy as np

    from . import plots

    os.makedirs(out_dir, exist_ok=True)
    written = [os.path.join(out_dir, "samples.npz")]
    arrays = {"samples": samples.numpy()}
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy()
    np.savez(written[0], **arrays)
    png = os.path.join(out_dir, "samples.png")
    try:
        if kind == "points":
            panels = {"data": reference, "samples": samples} if reference is not None else {"samples": samples}
            plots.scatter(png, panels, title)
        elif kind == "image":
            images = samples[:64] if picture is None else picture
            plots.image_grid(png, images, nrow=len(images) // rows if rows else None, title=title)
        else:
            return written
    except ImportError as e:
        print(f"sit-ext: no picture written: {e}", file=sys.stderr)
        return written
    return written + [png]


def cmd_sample(args) -> int:
    from .models import SiT
    from .training import build_model, make_transport
    from .transport import Transport

    device = resolve_device(args.device)
    if (args.ckpt is None) == (args.official is None):
        raise ValueError("pass exactly one of --ckpt (a sit_ext checkpoint) or --official (an official SiT file)")
    if args.official:
        model = SiT.from_pretrained(args.official, model=args.model, input_size=args.image_size // 8)
        transport = Transport("linear", "velocity", model_time="official")
        shape, kind, num_classes = (model.in_channels, model.input_size, model.input_size), "image", model.num_classes
        reference = None
    else:
        ckpt = load_checkpoint(args.ckpt)
        cfg = TrainConfig.from_dict(ckpt["config"])
        info = ckpt.get("data") or {}
        if "shape" not in info:
            raise CheckpointError(f"{args.ckpt!r} does not record its data's shape")
        spec = data_lib.Dataset(info.get("name", cfg.data), torch.empty(0, *info["shape"]), None,
                                info.get("num_classes"))
        model = build_model(cfg, spec)
        which = "ema" if args.weights == "ema" else "model"
        load_weights(model, ckpt[which], f"the checkpoint's {which} weights")
        transport = make_transport(cfg)
        shape, kind, num_classes = tuple(info["shape"]), spec.kind, info.get("num_classes")
        reference = None
        if kind == "points" and cfg.data in data_lib.TOYS:
            reference = data_lib.toy_2d(cfg.data, args.num_samples, torch.Generator().manual_seed(12345))
    model = model.to(device).eval()
    model.fused = args.fused
    labels = _labels(args, num_classes, args.num_samples, device)
    t0 = time.perf_counter()
    samples = _sample_with(transport, model, shape, args.num_samples, args, labels, device)
    seconds = time.perf_counter() - t0
    title = f"{args.method.upper()} {args.solver}, {args.steps} steps" + (
        f", cfg {args.cfg_scale:g}" if args.cfg_scale != 1.0 else "")
    written = write_samples(args.out, samples, labels, kind, title, reference)
    print(f"{args.num_samples} samples in {seconds:.1f} s: " + ", ".join(written))
    return 0


def _add_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", help="a sit_ext checkpoint (latest.pt of a run)")
    p.add_argument("--weights", default="ema", choices=["ema", "model"])
    p.add_argument("--official", help="an official SiT checkpoint file (local; never downloaded)")
    p.add_argument("--model", default="SiT-XL/2", help="preset of the --official file")
    p.add_argument("--image-size", type=int, default=256, help="image size of the --official model (latents /8)")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--method", default="ode", choices=["ode", "sde"])
    p.add_argument("--solver", default="heun", help="ode: euler, heun, dopri5, ...; sde: euler, heun")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--atol", type=float, default=1e-6)
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--diffusion-form", default="sigma")
    p.add_argument("--diffusion-norm", type=float, default=1.0)
    p.add_argument("--last-step", default="Mean", help="Mean, Tweedie, Euler or none")
    p.add_argument("--last-step-size", type=float, default=0.04)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--cfg-interval", type=float, nargs=2, default=[0.0, 1.0], metavar=("T_LO", "T_HI"))
    p.add_argument("--labels", type=int, nargs="+", help="class labels to cycle through (default: all)")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="samples")
    p.add_argument("--quiet", action="store_true")


# ------------------------------------------------------------------ bench


def cmd_bench(args) -> int:
    from . import benchmark, plots

    benchmark.reexec_with_stable_allocator()
    os.makedirs(args.out, exist_ok=True)
    device = resolve_device(args.device)
    stamp = time.strftime("%Y-%m-%d")
    ops_json = os.path.join(args.out, f"{stamp}-{device.type}-ops.json")
    result = benchmark.run(args.ops or list(benchmark.OP_FAMILIES), str(device), quick=args.quick, out=ops_json)
    if args.models:
        benchmark.run_models(str(device), compile_=not args.no_compile,
                             out=os.path.join(args.out, f"{stamp}-{device.type}-models.json"))
    rows = result["results"]
    labels = [f"{r['op']} {r['mode']} {r['size']} B{r['shape'][0]} {r['dtype']}" for r in rows]
    png = os.path.join(args.out, f"{stamp}-{device.type}-speedups.png")
    try:
        plots.speedup_bars(png, labels, {"vs eager": [r["x_vs_eager"] for r in rows],
                                         "vs torch.compile": [r["x_vs_compiled"] for r in rows]},
                           title=f"sit_ext on {result['meta'].get('device_name', result['meta']['cpu'])}")
        print(f"# wrote {png}")
    except ImportError as e:
        print(f"sit-ext: no chart written: {e}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------- demo


def cmd_demo(args) -> int:
    """Trains a small SiT on built-in data, samples it, writes the picture,
    prints a quality figure and the fused vs unfused training-step speed."""
    from .training import train

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    digits = args.data == "digits"
    steps = args.steps or ((3000 if cuda else 1200) if not digits else (3000 if cuda else 1500))
    cfg = TrainConfig(data=args.data, model="SiT-S/2" if digits else "vector", hidden_size=128, depth=4, heads=4,
                      patch_size=2 if digits else None, lr=1e-3, batch_size=256 if digits else 512, steps=steps,
                      ema_decay=0.995, seed=args.seed, out=args.out, ckpt_every=steps, log_every=50,
                      device=str(device), fused=True)
    print(f"sit-ext demo: training a {cfg.depth}-block SiT (D={cfg.hidden_size}) on {cfg.data} for {steps} steps "
          f"on {device}")
    summary = train(cfg, progress=not args.quiet)
    ema, transport = summary["ema"].eval(), summary["transport"]
    print(f"trained in {summary['seconds']:.0f} s ({summary['it_s']:.1f} it/s), final loss {summary['loss']:.4f}")

    gen = torch.Generator(device).manual_seed(args.seed + 1)
    if not digits:
        n = 5000
        z = torch.randn(n, 2, device=device, generator=gen)
        samples = transport.sample_ode(ema, z, method="heun", num_steps=50).float().cpu()
        held_out = data_lib.toy_2d(cfg.data, n, torch.Generator().manual_seed(10_000 + args.seed))
        fresh = data_lib.toy_2d(cfg.data, n, torch.Generator().manual_seed(20_000 + args.seed))
        quality = data_lib.sliced_wasserstein(samples, held_out)
        floor = data_lib.sliced_wasserstein(fresh, held_out)
        written = write_samples(args.out, samples, None, "points",
                                f"{cfg.data}: sliced W1 {quality:.3f} (data vs data {floor:.3f})", held_out)
        print(f"quality: sliced Wasserstein distance to held-out data {quality:.4f} "
              f"(a fresh draw of the data: {floor:.4f})")
        result = {"sliced_wasserstein": quality, "floor": floor}
    else:
        per_class = 20
        labels = torch.arange(10, device=device).repeat_interleave(per_class)
        z = torch.randn(len(labels), 1, 8, 8, device=device, generator=gen)
        samples = transport.sample_ode(ema, z, method="heun", num_steps=50, model_kwargs={"y": labels},
                                       cfg_scale=args.cfg_scale).float().cpu()
        x, y = data_lib.load_digits()
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        train_idx, test_idx = perm[:1500], perm[1500:]
        judge = data_lib.DigitClassifier(x[train_idx], y[train_idx])
        quality, floor = judge.accuracy(samples, labels), judge.accuracy(x[test_idx], y[test_idx])
        per_row = samples.view(10, per_class, 1, 8, 8)[:, :8].reshape(-1, 1, 8, 8)  # a row per class
        written = write_samples(args.out, samples, labels, "image",
                                f"digits 0-9, a row each, cfg {args.cfg_scale:g}: class accuracy {quality:.2f}",
                                picture=per_row, rows=10)
        print(f"quality: a classifier trained on real digits recognises the requested class in {quality:.1%} "
              f"of the samples (held-out real digits: {floor:.1%})")
        result = {"class_accuracy": quality, "real_accuracy": floor}
    print("wrote " + ", ".join(written))

    fused_ms, unfused_ms = _step_speed(cfg, device)
    print(f"training step on this machine: fused {fused_ms:.1f} ms, unfused {unfused_ms:.1f} ms "
          f"(x{unfused_ms / fused_ms:.2f})")
    result |= {"fused_step_ms": fused_ms, "unfused_step_ms": unfused_ms, "train_seconds": summary["seconds"],
               "steps": steps, "loss": summary["loss"]}
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


def _step_speed(cfg: TrainConfig, device: torch.device, rounds: int = 15) -> tuple[float, float]:
    """Median ms per training step (forward, backward, AdamW) of the demo's
    model, fused and unfused, measured in turns."""
    from .benchmark import time_medians
    from .training import build_model, make_transport

    ds = data_lib.load(cfg.data, 4096, seed=cfg.seed)
    x = ds.x[: cfg.batch_size].to(device)
    kwargs = {"y": ds.labels[: cfg.batch_size].to(device)} if ds.labels is not None else None
    transport = make_transport(cfg)
    fns = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = build_model(cfg, ds).to(device)
        model.fused = fused
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)

        def step(model=model, opt=opt):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = transport.training_losses(model, x, model_kwargs=kwargs)["loss"].mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns["fused" if fused else "unfused"] = step
    times = time_medians(fns, device, warmup=3, min_rounds=rounds, min_seconds=2.0)
    return times["fused"] * 1e3, times["unfused"] * 1e3


# ------------------------------------------------------------------- main


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sit-ext", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="the build, and the device")
    info.add_argument("--device", default="auto")
    info.set_defaults(fn=cmd_info)
    train = sub.add_parser("train", help="train a SiT", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_train_args(train, TrainConfig())
    train.set_defaults(fn=cmd_train)
    sample = sub.add_parser("sample", help="sample from a checkpoint",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_sample_args(sample)
    sample.set_defaults(fn=cmd_sample)
    bench = sub.add_parser("bench", help="kernel and model benchmarks: table, JSON, PNG chart")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--ops", nargs="+", help="op families (default: all)")
    bench.add_argument("--quick", action="store_true", help="one size and batch per op")
    bench.add_argument("--models", action=argparse.BooleanOptionalAction, default=True,
                       help="also the SiT train step and sampling forward")
    bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile model variants")
    bench.add_argument("--out", default="bench-results")
    bench.set_defaults(fn=cmd_bench)
    demo = sub.add_parser("demo", help="train, sample, picture, quality and speed in a couple of minutes")
    demo.add_argument("--data", default="moons",
                      help=f"{', '.join(data_lib.TOYS)} or digits (checkerboard and 8gaussians need more --steps)")
    demo.add_argument("--steps", type=int, help="training steps (default: fits ~2 minutes on 2 CPU cores)")
    demo.add_argument("--cfg-scale", type=float, default=2.0, help="guidance for digits")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="auto")
    demo.add_argument("--out", default="sit-ext-demo")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, ImportError, FileNotFoundError) as e:
        # Bad input (a missing or corrupt checkpoint, unknown names, unusable data): a message, not a traceback.
        print(f"sit-ext {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
