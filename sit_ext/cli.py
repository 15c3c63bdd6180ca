"""The sit-ext command (also python -m sit_ext): info, train, sample,
tune-sampler, encode, export, evaluate, bench and demo. Run sit-ext <command> --help for the options."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
import time

import torch

from . import data as data_lib
from ._build import build_info, format_build_info
from ._io import first_line
from .bench import samplers
from .training import CheckpointError, TrainConfig, load_checkpoint, load_weights, resolve_device

# ------------------------------------------------------------------- info


def cmd_info(args) -> int:
    device = resolve_device(args.device)  # a bad --device fails before anything is printed
    print(format_build_info(build_info()))
    from .bench.report import _cpu_name

    print(f"cpu:              {_cpu_name()} ({torch.get_num_threads()} threads)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device:           {device} ({name})")
    return 0


# ------------------------------------------------------------------ train


_UNSET = {"model": "SiT-S/2 for image data, vector for other arrays", "loss_weight": "none",
          "train_eps": "the path's, as the official code", "grad_clip": "none",
          "sample_eps": "the path's, as the official code"}


def _default(name: str) -> str:
    """The default of a train flag, as --help shows it: per built-in data set where those differ."""
    from .training import DATA_DEFAULTS

    def text(value):
        return _UNSET.get(name, "the model's") if value is None else value

    generic = getattr(TrainConfig(), name)
    toy, digits = DATA_DEFAULTS[data_lib.TOYS[0]].get(name, generic), DATA_DEFAULTS["digits"].get(name, generic)
    if toy == digits == generic:
        return f"default: {text(generic)}"
    if toy == digits:
        return f"default: {text(toy)} for the built-in data, else {text(generic)}"
    return f"default: {text(toy)} for the 2-D toys, {text(digits)} for digits, else {text(generic)}"


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """Every flag defaults to None here, so that the ones given can be told
    apart (a resumed run keeps its own values); --help shows the real defaults."""

    def flag(group, name, help_text="", **kwargs):
        field = name.lstrip("-").replace("-", "_")
        text = f"{help_text} ({_default(field)})" if help_text else f"({_default(field)})"
        group.add_argument(name, default=None, help=text, **kwargs)

    g = p.add_argument_group("data and model")
    flag(g, "--data", f"{', '.join(data_lib.TOYS)}, digits, or a folder of .npy/.pt arrays")
    flag(g, "--data-size", "points drawn for a 2-D toy", type=int)
    flag(g, "--model", "'vector', or a preset such as SiT-S/2 for images")
    flag(g, "--hidden-size", type=int)
    flag(g, "--depth", type=int)
    flag(g, "--heads", type=int)
    flag(g, "--patch-size", type=int)
    flag(g, "--class-dropout-prob", type=float)
    g = p.add_argument_group("path")
    flag(g, "--path", "linear, cosine (gvp) or vp")
    flag(g, "--prediction", "velocity, noise or score")
    flag(g, "--loss-weight", "velocity or likelihood (noise/score)")
    flag(g, "--train-eps", type=float)
    flag(g, "--sample-eps", type=float)
    flag(g, "--time-sampler", "uniform or logit_normal")
    g = p.add_argument_group("optimisation")
    flag(g, "--lr", type=float)
    flag(g, "--weight-decay", type=float)
    flag(g, "--batch-size", type=int)
    flag(g, "--steps", "the step to train up to", type=int)
    flag(g, "--grad-clip", type=float)
    flag(g, "--ema-decay", "warmed up as min(decay, (1 + step) / (10 + step))", type=float)
    flag(g, "--precision", "auto: bf16 autocast on CUDA, fp32 on CPU", choices=["auto", "fp32", "bf16"])
    flag(g, "--compile", "torch.compile the model", action="store_true")
    flag(g, "--cuda-graph", "capture the whole step (forward, loss, backward, AdamW) in one CUDA graph, "
         "replayed each step; CUDA only, one process, a fixed batch size", action="store_true")
    flag(g, "--fused", "fused kernels or plain PyTorch", action=argparse.BooleanOptionalAction)
    flag(g, "--seed", type=int)
    flag(g, "--device", "auto, cpu, cuda, cuda:1, ...")
    g = p.add_argument_group("output")
    flag(g, "--out", "run folder: latest.pt, log.jsonl, config.json")
    flag(g, "--ckpt-every", type=int)
    flag(g, "--log-every", type=int)
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue the run in --out (or from the checkpoint given): its settings apply, a "
                        "conflicting flag is an error; --steps, --ckpt-every, --log-every, --device, --compile, "
                        "--cuda-graph and --fused may change")
    g.add_argument("--overwrite", action="store_true", help="start again in an --out that holds a run")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_train(args) -> int:
    from .training import _POSITIVE_FIELDS, TrainingInterrupted, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    for name in _POSITIVE_FIELDS:
        if name in given and given[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {given[name]}")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues a run and --overwrite starts it again: pass one")
    resume, cfg = None, None
    if args.resume:  # train loads the checkpoint and merges its config with the flags given
        out = given.get("out", TrainConfig().out)
        resume = os.path.join(out, "latest.pt") if args.resume == "auto" else args.resume
    else:
        cfg = TrainConfig.for_data(given.get("data", TrainConfig().data),
                                   **{k: v for k, v in given.items() if k != "data"})
    try:
        summary = train(cfg, resume=resume, progress=not args.quiet, overwrite=args.overwrite, given=given,
                        warn=lambda message: print(f"sit-ext train: warning: {message}", file=sys.stderr))
    except TrainingInterrupted as e:
        print(f"sit-ext train: interrupted at step {e.step}; checkpoint {e.checkpoint} "
              f"(continue with --resume)", file=sys.stderr)
        return 130
    if summary["rank"] == 0:
        span = f" (steps {summary['first_step']} to {summary['steps']})" if summary["first_step"] else ""
        print(f"trained {summary['steps_done']} steps{span}, loss {summary['loss']:.4f}, "
              f"{summary['it_s']:.1f} it/s; checkpoint {summary['checkpoint']}")
    if summary["world"] > 1:
        torch.distributed.destroy_process_group()
    return 0


# ----------------------------------------------------------------- sample


def _sample_batch(transport, model, z, labels, args, gen, progress):
    """One batch from the noise z, ODE or SDE as asked (gen: the SDE's noise)."""
    common = dict(model_kwargs={"y": labels} if labels is not None else None, cfg_scale=args.cfg_scale,
                  cfg_interval=tuple(args.cfg_interval), progress=progress, cuda_graph=args.cuda_graph)
    if args.tuned is not None:
        return transport.sample_ode(model, z, sampler=args.tuned, **common)
    common |= dict(schedule=args.schedule, schedule_param=args.schedule_param)
    if args.method == "ode":
        return transport.sample_ode(model, z, method=args.solver, num_steps=args.steps, atol=args.atol,
                                    rtol=args.rtol, **common)
    return transport.sample_sde(model, z, method=args.solver,
                                num_steps=args.steps, diffusion_form=args.diffusion_form,
                                diffusion_norm=args.diffusion_norm,
                                last_step=None if args.last_step == "none" else args.last_step,
                                last_step_size=args.last_step_size, generator=gen, **common)


def _sample_with(transport, model, shape, n, args, labels, device):
    """n samples in batches of args.batch_size, ODE or SDE as asked."""
    gen = torch.Generator(device).manual_seed(args.seed)
    out = []
    for start in range(0, n, args.batch_size):
        count = min(args.batch_size, n - start)
        z = torch.randn(count, *shape, device=device, generator=gen)
        y = labels[start : start + count] if labels is not None else None
        out.append(_sample_batch(transport, model, z, y, args, gen, not args.quiet).float().cpu())
    return torch.cat(out)


def _labels(args, num_classes, n, device):
    if not num_classes:
        if args.labels:
            raise ValueError("this model has no classes: drop --labels")
        if args.cfg_scale != 1.0:
            raise ValueError("--cfg-scale guides toward a class, and this model has no classes: drop it")
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


def _read_checkpoint(path: str) -> dict:
    """A training checkpoint (.pt), or a ``sit-ext export`` (.safetensors, read
    without pickle) as the same kind of dict: config, data, step and the one set
    of weights it holds, under its name ("ema" or "model")."""
    from .models import read_safetensors

    if not path.endswith(".safetensors"):
        return load_checkpoint(path)
    state, meta = read_safetensors(path)
    try:
        config, info, which = json.loads(meta["config"]), json.loads(meta["data"]), meta["weights"]
    except (KeyError, ValueError):
        raise CheckpointError(f"{path!r} is not a sit-ext export: its metadata lacks the run's config, data or "
                              "weights (sit-ext export writes them)") from None
    return {"config": config, "data": info, which: state, "step": int(meta.get("step", 0)),
            "ema_warmup": meta.get("ema_warmup") == "1"}


def _load_sampler(args, device):
    """(model, transport, sample shape, kind, num_classes, reference points)
    for --official or --ckpt."""
    from .models import SiT
    from .training import build_model, make_transport
    from .transport import Transport

    if (args.ckpt is None) == (args.official is None):
        raise ValueError("pass exactly one of --ckpt (a sit_ext checkpoint) or --official (an official SiT file)")
    reference = None
    if args.ckpt:  # the checkpoint records its model and data shape
        given = [flag for flag, value in (("--model", args.model), ("--image-size", args.image_size)) if value]
        if given:
            raise ValueError(f"{' and '.join(given)} describe an --official file; a --ckpt records its own model "
                             "and size: drop them")
    if args.official:
        args.model = args.model or "SiT-XL/2"
        args.image_size = args.image_size or 256
        if args.image_size % 8:
            raise ValueError(f"--image-size must be a multiple of 8 (the VAE's factor), got {args.image_size}")
        model = SiT.from_pretrained(args.official, model=args.model, input_size=args.image_size // 8,
                                    weights=args.weights)
        transport = Transport("linear", "velocity", model_time="official")
        shape, kind, num_classes = (model.in_channels, model.input_size, model.input_size), "image", model.num_classes
    else:
        ckpt = _read_checkpoint(args.ckpt)
        cfg = TrainConfig.from_dict(ckpt["config"])
        info = ckpt.get("data") or {}
        if "shape" not in info:
            raise CheckpointError(f"{args.ckpt!r} does not record its data's shape")
        spec = data_lib.Dataset(info.get("name", cfg.data), torch.empty(0, *info["shape"]), None,
                                info.get("num_classes"))
        model = build_model(cfg, spec)
        which = "ema" if args.weights == "ema" else "model"
        if which not in ckpt:
            other = "model" if which == "ema" else "ema"
            raise CheckpointError(f"{args.ckpt!r} holds only the {other} weights: pass --weights {other}")
        load_weights(model, ckpt[which], f"the checkpoint's {which} weights")
        step = int(ckpt.get("step", 0))
        if which == "ema" and not ckpt.get("ema_warmup") and step * (1 - cfg.ema_decay) < 3:
            # Checkpoints from before the EMA warm-up: an EMA of decay d needs a few 1 / (1 - d) steps.
            print(f"sit-ext sample: warning: the EMA weights have seen only {step} updates at decay "
                  f"{cfg.ema_decay} and are still close to the initial ones; sample with --weights model, "
                  "or train longer", file=sys.stderr)
        transport = make_transport(cfg)
        shape, kind, num_classes = tuple(info["shape"]), spec.kind, info.get("num_classes")
        if kind == "points" and cfg.data in data_lib.TOYS:
            reference = data_lib.toy_2d(cfg.data, args.num_samples, torch.Generator().manual_seed(12345))
    model = model.to(device).eval()
    model.fused = args.fused
    return model, transport, shape, kind, num_classes, reference


def _sample_seed(seed: int, index: int, stream: int) -> int:
    """A generator seed of its own for each (--seed, sample index, stream):
    stream 0 draws sample `index`'s starting noise, 1 the SDE noise of a batch
    that starts with it."""
    return (seed * 2**31 + index) * 2 + stream


def _sample_images(args) -> int:
    """--vae: decoded images, one PNG per sample in OUT/images (named by its
    index), then OUT/samples.npz (ADM's layout) and OUT/samples.png (a grid).
    Under torchrun rank r draws samples r, r + world, ...; sample i starts from
    noise seeded by (--seed, i). PNGs already there are kept and skipped, so a
    stopped run resumes, on any number of GPUs, where it stopped."""
    import numpy as np
    from tqdm.auto import tqdm

    from . import images as images_lib
    from . import vae as vae_lib
    from .training import _distributed

    rank, world, local_rank = _distributed()
    device = resolve_device(args.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model, transport, shape, kind, num_classes, _ = _load_sampler(args, device)
    if kind != "image":
        raise ValueError(f"--vae decodes image latents; this model makes {kind} data")
    vae = vae_lib.load_vae(args.vae, device)
    if shape[0] != vae.config.latent_channels:
        raise ValueError(f"the model makes {shape[0]}-channel latents, the VAE {args.vae!r} decodes "
                         f"{vae.config.latent_channels}")
    labels = _labels(args, num_classes, args.num_samples, "cpu")
    folder = os.path.join(args.out, "images")
    os.makedirs(folder, exist_ok=True)
    _check_sampling_settings(folder, args)
    path = os.path.join(folder, "{:06d}.png").format
    mine = range(rank, args.num_samples, world)
    todo = [i for i in mine if not os.path.exists(path(i))]
    t0 = time.perf_counter()
    with tqdm(total=len(mine), initial=len(mine) - len(todo), desc="sample", unit="img", dynamic_ncols=True,
              disable=args.quiet or rank != 0) as bar:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start : start + args.batch_size]
            z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(_sample_seed(args.seed, i, 0)))
                             for i in batch]).to(device)
            gen = torch.Generator(device).manual_seed(_sample_seed(args.seed, batch[0], 1))
            y = labels[batch].to(device) if labels is not None else None
            latents = _sample_batch(transport, model, z, y, args, gen, progress=False)
            for i, image in zip(batch, images_lib.to_uint8(vae_lib.decode(vae, latents))):
                images_lib.save_png(path(i), image)
            bar.update(len(batch))
    drawn = torch.tensor([len(todo)], device=device)
    if world > 1:
        torch.distributed.all_reduce(drawn)
    if rank == 0:
        # One chunk of images in memory at a time: 50,000 at 512 x 512 would be 39 GB.
        first = images_lib.read_image(path(0))
        chunks = (np.stack([images_lib.read_image(path(i)) for i in range(start, min(start + 256, args.num_samples))])
                  for start in tqdm(range(0, args.num_samples, 256), desc="collect", disable=args.quiet,
                                    dynamic_ncols=True))
        npz, png = os.path.join(args.out, "samples.npz"), os.path.join(args.out, "samples.png")
        images_lib.write_npz(npz, chunks, (args.num_samples, *first.shape), labels.numpy() if labels is not None
                             else None)
        images_lib.save_grid(png, np.stack([images_lib.read_image(path(i)) for i in range(min(64, args.num_samples))]))
        print(f"{args.num_samples} images {list(first.shape)}: {drawn.item()} drawn in "
              f"{time.perf_counter() - t0:.1f} s, {args.num_samples - drawn.item()} kept from before; "
              f"{folder}, {npz}, {png}")
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


_RUN_ONLY = ("num_samples", "batch_size", "device", "fused", "quiet", "out", "fn", "command", "tuned", "force")


def _file_digest(path: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _check_sampling_settings(folder: str, args) -> None:
    """OUT/images/settings.json records what drew its images, the checkpoint's
    contents included (a run trained on keeps its path); a resumed run with
    other settings would mix two kinds of sample, and is refused. A folder with
    no image yet takes the new settings."""
    settings = {k: v for k, v in vars(args).items() if k not in _RUN_ONLY}
    settings["checkpoint_digest"] = _file_digest(args.ckpt or args.official)
    path = os.path.join(folder, "settings.json")
    if os.path.exists(path) and any(f.endswith(".png") for f in os.listdir(folder)):
        try:
            with open(path) as f:
                saved = json.load(f)
        except ValueError as e:
            saved = first_line(e)
        if not isinstance(saved, dict):
            raise ValueError(f"{path} is damaged ({saved}), so the images in {folder} cannot be checked against "
                             "these settings: choose another --out, or delete that folder to start again")
        changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if changed:
            what = ", ".join("the checkpoint's contents" if k == "checkpoint_digest" else k for k in changed)
            raise ValueError(f"{folder} holds images drawn with other settings ({what}): resume with the same "
                             "ones, or choose another --out")
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(settings, f, indent=1)
    os.replace(tmp, path)


def _check_seed(seed: int) -> None:
    if not 0 <= seed < 2**31:
        raise ValueError(f"--seed must be in [0, 2**31), got {seed}")


def _tuned_sampler(args):
    """The --sampler file, checked against this run: the solver and its steps
    are the sampler's (other values are refused); another checkpoint, --weights
    or guidance is refused unless --force, which warns and goes on."""
    from .tuned import load_sampler, mismatches

    if args.method != "ode":
        raise ValueError("--sampler is an ODE sampler: drop --method sde")
    if args.solver is not None or args.schedule != "uniform" or args.schedule_param is not None:
        raise ValueError("--sampler sets the solver and its time grid: drop --solver, --schedule and --schedule-param")
    sampler = load_sampler(args.sampler)
    if args.steps is not None and args.steps != sampler.settings["steps"]:
        raise ValueError(f"--sampler {args.sampler} was fitted for {sampler.nfe} NFE ({sampler.settings['steps']} "
                         f"{sampler.base} steps), not --steps {args.steps}: drop --steps, or tune one for that NFE")
    used = {"checkpoint_digest": _file_digest(args.ckpt or args.official), "weights": args.weights,
            "cfg_scale": args.cfg_scale, "cfg_interval": [float(v) for v in args.cfg_interval]}
    names = {"checkpoint_digest": "the checkpoint's contents", "weights": "--weights", "cfg_scale": "--cfg-scale",
             "cfg_interval": "--cfg-interval"}
    problems = [f"{names[p.split(':')[0]]} ({p.split(': ', 1)[1]})" for p in mismatches(sampler, **used)]
    if problems:
        message = (f"--sampler {args.sampler} was fitted for other settings: {'; '.join(problems)}"
                   f" (fitted to {sampler.settings.get('checkpoint')})")
        if not args.force:
            raise ValueError(message + "; pass --force to use it anyway")
        print(f"sit-ext sample: warning: {message}", file=sys.stderr)
    return sampler


def cmd_sample(args) -> int:
    for flag, value in (("--num-samples", args.num_samples), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.force and not args.sampler:
        raise ValueError("--force overrides a --sampler's checks: pass --sampler")
    args.tuned = _tuned_sampler(args) if args.sampler else None
    args.solver = args.solver or "heun"
    args.steps = (args.tuned.settings["steps"] if args.tuned else 50) if args.steps is None else args.steps
    if args.method == "sde" and args.solver not in ("euler", "heun"):  # it once ran Euler-Maruyama instead
        raise ValueError(f"--solver {args.solver} is not an SDE solver: --method sde takes euler or heun")
    _check_seed(args.seed)
    if args.cfg_scale == 1.0 and tuple(args.cfg_interval) != (0.0, 1.0):
        raise ValueError("--cfg-interval limits guidance, and there is none: pass --cfg-scale too")
    if args.schedule_param is not None and args.schedule == "uniform":
        raise ValueError("--schedule-param sets the shift or power of --schedule shift or power; the uniform "
                         "schedule has none")
    if args.cuda_graph:
        if args.method == "ode" and args.solver not in ("euler", "heun", "adams"):
            raise ValueError(f"--cuda-graph needs a fixed-step solver (euler, heun, adams), got --solver "
                             f"{args.solver}: torchdiffeq's solvers choose their steps on the host")
        device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
        if device.type != "cuda":
            raise ValueError(f"--cuda-graph needs a CUDA device, got --device {args.device} ({device})")
    if args.vae:
        return _sample_images(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("under torchrun, sample writes images: pass --vae")
    device = resolve_device(args.device)
    model, transport, shape, kind, num_classes, reference = _load_sampler(args, device)
    labels = _labels(args, num_classes, args.num_samples, device)
    t0 = time.perf_counter()
    samples = _sample_with(transport, model, shape, args.num_samples, args, labels, device)
    seconds = time.perf_counter() - t0
    from .transport import ODE_FIXED, TORCHDIFFEQ_FIXED

    adaptive = args.method == "ode" and args.solver not in (*ODE_FIXED, "adams", *TORCHDIFFEQ_FIXED)
    steps = f"atol {args.atol:g}, rtol {args.rtol:g}" if adaptive else f"{args.steps} steps"
    solver = f"tuned {args.tuned.base}" if args.tuned else args.solver
    title = f"{args.method.upper()} {solver}, {steps}" + (
        f", cfg {args.cfg_scale:g}" if args.cfg_scale != 1.0 else "")
    written = write_samples(args.out, samples, labels, kind, title, reference)
    print(f"{args.num_samples} samples in {seconds:.1f} s: " + ", ".join(written))
    return 0


def _add_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", help="a sit_ext checkpoint (latest.pt of a run) or its sit-ext export (.safetensors)")
    p.add_argument("--weights", default="ema", choices=["ema", "model"])
    p.add_argument("--official", help="an official SiT checkpoint file (local; never downloaded)")
    p.add_argument("--model", help="preset of the --official file (default: SiT-XL/2)")
    p.add_argument("--image-size", type=int, help="image size of the --official model, latents /8 (default: 256)")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--method", default="ode", choices=["ode", "sde"])
    p.add_argument("--solver", help="ode: euler, heun, adams (one evaluation a step), rk4, dopri5, ...; sde: euler, "
                                    "heun (default heun)")
    p.add_argument("--schedule", default="uniform", choices=["uniform", "shift", "power"],
                   help="the time grid of fixed-step solvers")
    p.add_argument("--schedule-param", type=float, help="shift s or power rho (default: the schedule's)")
    p.add_argument("--steps", type=int, help="steps of a fixed-step solver (default 50; with --sampler, its own)")
    p.add_argument("--atol", type=float, default=1e-6)
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--diffusion-form", default="sigma",
                   choices=["constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing"])
    p.add_argument("--diffusion-norm", type=float, default=1.0)
    p.add_argument("--last-step", default="Mean", choices=["Mean", "Tweedie", "Euler", "none"],
                   help="the SDE's last step to t = 0")
    p.add_argument("--last-step-size", type=float, default=0.04)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--cfg-interval", type=float, nargs=2, default=[0.0, 1.0], metavar=("T_LO", "T_HI"))
    p.add_argument("--labels", type=int, nargs="+", help="class labels to cycle through (default: all)")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay the model's evaluation (guidance included) from one CUDA graph per batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="samples")
    p.add_argument("--vae", help="decode with this AutoencoderKL (a local folder or a cached Hub id) to images: "
                                 "OUT/images/*.png (kept on a rerun: it resumes), OUT/samples.npz (ADM layout), "
                                 "OUT/samples.png; runs under torchrun")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--sampler", help="a sampler tuned to this checkpoint (sit-ext tune-sampler): its solver, grid and "
                                     "steps")
    p.add_argument("--force", action="store_true",
                   help="use --sampler with another checkpoint, --weights or guidance than it was fitted for")


# ----------------------------------------------------------- tune-sampler


def cmd_tune_sampler(args) -> int:
    from .tuned import initial_sampler, save_sampler, tune_sampler

    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out must name a .safetensors file, got {args.out!r}")
    if os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} is a folder")
    for flag, value, least in (("--nfe", args.nfe, 2), ("--samples", args.samples, 2), ("--held-out", args.held_out, 1),
                               ("--iterations", args.iterations, 1), ("--reference-steps", args.reference_steps, 2)):
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    if args.base == "heun" and args.nfe % 2:
        raise ValueError(f"--nfe must be even with --base heun (2 evaluations a step), got {args.nfe}")
    if args.cfg_scale == 1.0 and tuple(args.cfg_interval) != (0.0, 1.0):
        raise ValueError("--cfg-interval limits guidance, and there is none: pass --cfg-scale too")
    if args.schedule_param is not None and args.schedule == "uniform":
        raise ValueError("--schedule-param sets the shift or power of --schedule shift or power; the uniform "
                         "schedule has none")
    _check_seed(args.seed)
    device = resolve_device(args.device)
    model, transport, shape, _, num_classes, _ = _load_sampler(args, device)
    initial_sampler(transport, args.nfe, args.base, args.schedule, args.schedule_param)  # bad settings fail here
    for p in model.parameters():
        p.requires_grad_(False)
    sizes = [args.samples // 2, args.samples - args.samples // 2, args.held_out]
    labels = _labels(args, num_classes, sum(sizes), device)
    gen = torch.Generator(device).manual_seed(args.seed)
    noise = torch.randn(sum(sizes), *shape, device=device, generator=gen)
    ends = [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
    batches = [noise[a:b] for a, b in zip(ends, ends[1:])]
    kwargs = [{"y": labels[a:b]} if labels is not None else None for a, b in zip(ends, ends[1:])]
    reference = {"method": "adams", "num_steps": args.reference_steps, "schedule": "shift", "schedule_param": 0.5}
    sampler = tune_sampler(transport, model, batches, args.nfe, args.base, schedule=args.schedule,
                           schedule_param=args.schedule_param, model_kwargs=kwargs, cfg_scale=args.cfg_scale,
                           cfg_interval=tuple(args.cfg_interval), reference=reference, iterations=args.iterations,
                           progress=not args.quiet)
    sampler.settings |= {"checkpoint": os.path.abspath(args.ckpt), "checkpoint_digest": _file_digest(args.ckpt),
                         "weights": args.weights, "labels": args.labels}
    save_sampler(args.out, sampler)
    s = sampler.settings
    verdict = "accepted" if s["accepted"] else "not better than the start on held-out noise: the start kept"
    print(f"tuned {args.base} sampler, {args.nfe} NFE: held-out RMS {s['heldout_rms']:.4g} against "
          f"{s['base_heldout_rms']:.4g} at the start ({verdict}); {s['iterations']} fit evaluations, "
          f"{s['fit_evaluations'] + s['other_evaluations']} model rows, {s['seconds']:.1f} s: {args.out}")
    return 0


def _add_tune_sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="a sit_ext checkpoint (latest.pt of a run) or its export")
    p.add_argument("--weights", default="ema", choices=["ema", "model"])
    p.add_argument("--nfe", type=int, default=8, help="model evaluations of the sampler")
    p.add_argument("--base", default="adams", choices=["adams", "heun"], help="the solver it starts from")
    p.add_argument("--schedule", default="shift", choices=["uniform", "shift", "power"], help="the starting grid")
    p.add_argument("--schedule-param", type=float, default=0.5, help="its shift s or power rho")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="guidance the sampler is fitted for")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=[0.0, 1.0], metavar=("T_LO", "T_HI"))
    p.add_argument("--labels", type=int, nargs="+", help="class labels to cycle through (default: all)")
    p.add_argument("--samples", type=int, default=256, help="trajectories fitted (two batches)")
    p.add_argument("--held-out", type=int, default=128, help="trajectories for early stopping and acceptance")
    p.add_argument("--iterations", type=int, default=200, help="most loss-and-gradient evaluations (L-BFGS)")
    p.add_argument("--reference-steps", type=int, default=256, help="Adams steps of the accurate solve")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(official=None, model=None, image_size=None, num_samples=1)


# ---------------------------------------------------- encode, export, evaluate


def cmd_encode(args) -> int:
    from . import vae as vae_lib

    index = vae_lib.encode_folder(args.images, args.vae, args.out, image_size=args.image_size,
                                  batch_size=args.batch_size, shard_size=args.shard_size, flip=args.flip,
                                  seed=args.seed, device=resolve_device(args.device), progress=not args.quiet)
    classes = f"{index['num_classes']} classes" if index["num_classes"] is not None else "no labels"
    print(f"{index['count']} latents {index['shape']} (scaled by {index['scaling_factor']:g}), {classes}, in "
          f"{len(index['shards'])} shards: {args.out}; train with --data {args.out}")
    return 0


def cmd_export(args) -> int:
    from .models import save_safetensors

    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out must end in .safetensors, got {args.out!r}")
    ckpt = load_checkpoint(args.ckpt)
    if "shape" not in (ckpt.get("data") or {}):
        raise CheckpointError(f"{args.ckpt!r} does not record its data's shape")
    if args.weights not in ckpt:
        raise CheckpointError(f"{args.ckpt!r} holds no {args.weights} weights")
    metadata = {"format": "sit_ext", "weights": args.weights, "step": str(int(ckpt["step"])),
                "ema_warmup": "1" if ckpt.get("ema_warmup") else "0",
                "config": json.dumps(ckpt["config"]), "data": json.dumps(ckpt["data"])}
    save_safetensors(args.out, ckpt[args.weights], metadata)
    print(f"wrote {args.out}: the {args.weights} weights at step {ckpt['step']}, with the run's config")
    return 0


def cmd_evaluate(args) -> int:
    from . import evaluate
    from . import images as images_lib

    net = evaluate.inception(args.feature_weights, resolve_device(args.device))  # first: fails fast
    samples, ref = images_lib.read_images(args.samples), images_lib.read_images(args.ref)
    warning = evaluate.few_images_warning(len(samples), len(ref))
    if warning:
        print(f"sit-ext evaluate: warning: {warning}", file=sys.stderr)
    result = evaluate.evaluate_images(net, samples, ref, args.batch_size, progress=not args.quiet)
    rows = [("FID", f"{result['fid']:.4f}"),
            ("Inception Score", f"{result['inception_score']:.4f} ± {result['inception_score_std']:.4f}"),
            ("precision", f"{result['precision']:.4f}"), ("recall", f"{result['recall']:.4f}"),
            ("images", f"{result['samples']} samples, {result['ref']} reference")]
    for name, value in rows:
        print(f"{name:<17}{value}")
    print(json.dumps(result))
    return 0


def _add_image_commands(sub) -> None:
    encode = sub.add_parser("encode", help="a folder of images to VAE latent shards for train")
    encode.add_argument("--images", required=True, help="a folder of images; class subfolders give the labels")
    encode.add_argument("--vae", required=True, help="an AutoencoderKL: a local folder or a cached Hub id")
    encode.add_argument("--out", required=True, help="folder for the shards and latents.json")
    encode.add_argument("--image-size", type=int, default=256, help="center crop to this size (ADM's)")
    encode.add_argument("--flip", default="both", choices=["both", "random", "none"],
                        help="both: store each image and its mirror image; random: one of the two")
    encode.add_argument("--batch-size", type=int, default=32)
    encode.add_argument("--shard-size", type=int, default=10_000, help="latents per .npy shard")
    encode.add_argument("--seed", type=int, default=0, help="for the latent samples and random flips")
    encode.add_argument("--device", default="auto")
    encode.add_argument("--quiet", action="store_true", help="no progress bar")
    encode.set_defaults(fn=cmd_encode)
    export = sub.add_parser("export", help="a checkpoint's weights as .safetensors, with the run's config")
    export.add_argument("--ckpt", required=True, help="a sit_ext checkpoint (latest.pt of a run)")
    export.add_argument("--out", required=True, help="the .safetensors file to write")
    export.add_argument("--weights", default="ema", choices=["ema", "model"])
    export.set_defaults(fn=cmd_export)
    evaluate = sub.add_parser("evaluate", help="FID, Inception Score, precision, recall (torch-fidelity)")
    evaluate.add_argument("--samples", required=True, help="an ADM .npz (arr_0) or a folder of images")
    evaluate.add_argument("--ref", required=True, help="the reference images: an ADM .npz or a folder")
    evaluate.add_argument("--feature-weights", required=True,
                          help="torch-fidelity's InceptionV3 weights, a local file (.pth, or .safetensors): "
                               "weights-inception-2015-12-05-6726825d.pth from its releases")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(fn=cmd_evaluate)


# ------------------------------------------------------------------ bench


def cmd_bench(args) -> int:
    from . import plots
    from .bench import dispatch, harness, model_runner, op_cases, op_runner

    device = resolve_device(args.device)  # bad input fails here, before the restart
    _check_bench_flags(args)
    unknown = sorted(set(args.ops or ()) - set(op_cases.OP_FAMILIES))
    if unknown:
        raise ValueError(f"--ops: unknown op families {unknown}: choose from {sorted(op_cases.OP_FAMILIES)}")
    if args.tuned:
        args.device = str(device)
        samplers.run_tuned(args)
        return 0
    if args.digits is not None:
        samplers.run_digits(args.out, steps=args.digits, device=str(device), nfe=args.nfe, seed=args.seed or 0)
        return 0
    if args.dispatch:
        os.makedirs(args.out, exist_ok=True)
        dispatch.run_dispatch(os.path.join(args.out, f"{time.strftime('%Y-%m-%d')}-cpu-dispatch.json"))
        return 0
    if args.samplers:
        samplers.run(args.out, quick=args.quick, device=str(device), samples=args.samples, nfe=args.nfe,
                     seed=args.seed or 0)
        return 0
    harness.reexec_with_stable_allocator()
    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d")
    ops_json = os.path.join(args.out, f"{stamp}-{device.type}-ops.json")
    # --quick: under a minute on 2 CPU cores (25 s measured), the models included (SiT-S/8, no torch.compile).
    compile_ = not (args.no_compile or args.quick)
    result = op_runner.run(args.ops or list(op_cases.OP_FAMILIES), str(device), quick=args.quick, out=ops_json,
                           budget=40 if args.quick else None, compile_=compile_)
    if args.models is not False:
        models = model_runner.run_models(str(device), models=["SiT-S/8"] if args.quick else None,
                                         compile_=compile_, budget=20 if args.quick else None,
                                         peak=args.peak_tflops,
                                         out=os.path.join(args.out, f"{stamp}-{device.type}-models.json"))
        _model_chart(os.path.join(args.out, f"{stamp}-{device.type}-models.png"), models)
    rows = result["results"]
    labels = [f"{r['op']} {r['mode']} {r['size']} B{r['shape'][0]} {r['dtype']}" for r in rows]
    png = os.path.join(args.out, f"{stamp}-{device.type}-speedups.png")
    try:
        plots.speedup_bars(png, labels, _series_that_ran(
            {"vs eager": [r.get("x_vs_eager", float("nan")) for r in rows],
             "vs torch.compile": [r.get("x_vs_compiled", float("nan")) for r in rows]}),
            title=f"sit_ext on {result['meta'].get('device_name', result['meta']['cpu'])}")
        print(f"# wrote {png}")
    except ImportError as e:
        print(f"sit-ext: no chart written: {e}", file=sys.stderr)
    return 0


def _series_that_ran(series: dict[str, list[float]]) -> dict[str, list[float]]:
    """The chart's series without those of a variant that never ran (all NaN:
    torch.compile under --quick or --no-compile), which would be a legend entry
    with no bars."""
    return {name: values for name, values in series.items() if not all(math.isnan(v) for v in values)}


# The flags each bench mode reads; --out is everyone's.
_BENCH_FLAGS = {"the kernel and model benchmark": ("--ops", "--quick", "--models", "--no-compile", "--peak-tflops",
                                                   "--device"),
                "--samplers": ("--quick", "--samples", "--nfe", "--seed", "--device"),
                "--digits": ("--nfe", "--seed", "--device"),
                "--tuned": ("--nfe", "--seed", "--device"),  # with --digits STEPS: the digits model
                "--dispatch": ()}


def _check_bench_flags(args) -> None:
    """One mode at a time, and only its own flags: another mode's would be ignored."""
    # --tuned is a mode of its own, alone or as --samplers --tuned; with --digits STEPS it takes the digits model
    modes = [m for m, on in (("--samplers", args.samplers and not args.tuned),
                             ("--digits", args.digits is not None and not args.tuned), ("--tuned", args.tuned),
                             ("--dispatch", args.dispatch)) if on]
    if len(modes) > 1:
        raise ValueError(f"{modes[0]} and {modes[1]} are two benchmarks: run one at a time")
    mode = modes[0] if modes else "the kernel and model benchmark"
    given = {"--ops": args.ops is not None, "--quick": args.quick, "--models": args.models is not None,
             "--no-compile": args.no_compile, "--peak-tflops": args.peak_tflops is not None,
             "--samples": args.samples is not None, "--nfe": args.nfe is not None, "--seed": args.seed is not None,
             "--device": args.device != "auto"}
    for flag, on in given.items():
        if on and flag not in _BENCH_FLAGS[mode]:
            owners = [m for m, flags in _BENCH_FLAGS.items() if flag in flags]
            raise ValueError(f"{flag} is a flag of {' and '.join(owners)}, not of {mode}, which would ignore it: "
                             "drop it")
    if args.models is False and args.peak_tflops is not None:
        raise ValueError("--peak-tflops is for the model matrix's MFU, which --no-models leaves out: drop one")


def _model_chart(png: str, result: dict) -> None:
    """Each variant's speed against the best unfused variant of its row."""
    from . import plots
    from .bench.model_cases import MODEL_VARIANTS

    rows = [r for r in result["results"] if "best_unfused" in r]
    variants = [v for v in MODEL_VARIANTS if any("ms" in r.get(v, {}) for r in rows)]
    if not rows:
        return
    series = _series_that_ran({v: [r[r["best_unfused"]]["ms"] / r[v]["ms"] if "ms" in r.get(v, {}) else float("nan")
                                   for r in rows] for v in variants})
    try:
        plots.speedup_bars(png, [f"{r['model']} {r['mode']} B{r['batch']}" for r in rows], series,
                           title="SiT step: speed against the best unfused variant")
        print(f"# wrote {png}")
    except ImportError as e:
        print(f"sit-ext: no chart written: {e}", file=sys.stderr)


# ------------------------------------------------------------------- demo


def cmd_demo(args) -> int:
    """Trains a small SiT on built-in data, samples it, writes the picture,
    prints a quality figure and the fused vs unfused training-step speed."""
    from .evaluate import frechet_distance
    from .training import DATA_DEFAULTS, train

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    digits = args.data == "digits"
    if args.data not in DATA_DEFAULTS:
        raise ValueError(f"--data {args.data!r}: the demo runs on {', '.join(DATA_DEFAULTS)}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    steps = args.steps or (3000 if cuda else DATA_DEFAULTS[args.data]["steps"])
    out = args.out or tempfile.mkdtemp(prefix="sit-ext-demo-")
    cfg = TrainConfig.for_data(args.data, steps=steps, seed=args.seed, out=out, ckpt_every=steps, log_every=50,
                               device=str(device), fused=True)
    # Running the demo again into its own folder replaces it; a folder holding a training run is refused.
    demo_before = os.path.exists(os.path.join(out, "demo.json"))
    if not demo_before and os.path.exists(os.path.join(out, "latest.pt")):
        raise ValueError(f"--out {out} holds a training run, not a demo's: choose another --out")
    print(f"sit-ext demo: training a {cfg.depth}-block SiT (D={cfg.hidden_size}) on {cfg.data} for {steps} steps "
          f"on {device}; output in {out}")
    summary = train(cfg, progress=not args.quiet, overwrite=demo_before, log=lambda line: None)  # its own header
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
        written = write_samples(out, samples, None, "points",
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
        written = write_samples(out, samples, labels, "image",
                                f"digits 0-9, a row each, cfg {args.cfg_scale:g}: class accuracy {quality:.2f}",
                                picture=per_row, rows=10)
        print(f"quality: a classifier trained on real digits recognises the requested class in {quality:.1%} "
              f"of the samples (held-out real digits: {floor:.1%})")
        # The Frechet distance of `sit-ext evaluate`, on the classifier's features: samples and, as the
        # floor, as many real training digits, each against the held-out digits.
        fd = frechet_distance(judge.features(samples), judge.features(x[test_idx]))
        fd_floor = frechet_distance(judge.features(x[train_idx[: len(samples)]]), judge.features(x[test_idx]))
        print(f"quality: Frechet distance on the classifier's features {fd:.2f} (real digits: {fd_floor:.2f})")
        result = {"class_accuracy": quality, "real_accuracy": floor, "frechet": fd, "frechet_floor": fd_floor}
    print("wrote " + ", ".join(written))

    fused_ms, unfused_ms = _step_speed(cfg, device)
    print(f"training step on this machine: fused {fused_ms:.1f} ms, unfused {unfused_ms:.1f} ms "
          f"(x{unfused_ms / fused_ms:.2f})")
    result |= {"fused_step_ms": fused_ms, "unfused_step_ms": unfused_ms, "train_seconds": summary["seconds"],
               "steps": steps, "loss": summary["loss"]}
    with open(os.path.join(out, "demo.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


def _step_speed(cfg: TrainConfig, device: torch.device, rounds: int = 15) -> tuple[float, float]:
    """Median ms per training step (forward, backward, AdamW) of the demo's
    model, fused and unfused, measured in turns."""
    from .bench.harness import time_medians
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


class _Parser(argparse.ArgumentParser):
    """Defaults shown in --help, and a user error in one line (argparse's own
    prints the usage block first)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"formatter_class": _Help, **kwargs})

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Help(argparse.HelpFormatter):
    """Each option's default once, after its help, unless the help says it
    already or there is none worth showing (None, a flag that is off)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or not _shows_default(action):
            return text
        return f"{text} (default: %(default)s)"


def _shows_default(action: argparse.Action) -> bool:
    return bool(action.option_strings) and action.default is not None and action.default is not False \
        and action.default is not argparse.SUPPRESS


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sit-ext", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    info = sub.add_parser("info", help="the build, and the device")
    info.add_argument("--device", default="auto")
    info.set_defaults(fn=cmd_info)
    train = sub.add_parser("train", help="train a SiT")
    _add_train_args(train)
    train.set_defaults(fn=cmd_train)
    sample = sub.add_parser("sample", help="sample from a checkpoint")
    _add_sample_args(sample)
    sample.set_defaults(fn=cmd_sample)
    tune = sub.add_parser("tune-sampler", help="fit an ODE sampler to a checkpoint: few evaluations, its own grid")
    _add_tune_sampler_args(tune)
    tune.set_defaults(fn=cmd_tune_sampler)
    _add_image_commands(sub)
    bench = sub.add_parser("bench", help="kernel and model benchmarks: table, JSON, PNG chart")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--ops", nargs="+", help="op families (default: all)")
    bench.add_argument("--quick", action="store_true",
                       help="one size and batch per op, a small model, no torch.compile: under a minute")
    bench.add_argument("--models", action=argparse.BooleanOptionalAction,
                       help="also the SiT model matrix: train step and guided sampling step (default: on)")
    bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile model variants")
    bench.add_argument("--peak-tflops", type=float,
                       help="the device's dense bf16 peak for MFU (default: the datasheet value of an H100, H200 "
                            "or A100)")
    bench.add_argument("--out", default="bench-results")
    bench.add_argument("--samplers", action="store_true",
                       help="instead: sampler accuracy per model evaluation against exact answers (JSON, PNG)")
    bench.add_argument("--dispatch", action="store_true",
                       help="instead: per-call cost on one CPU thread at a tiny size, every fused op's forward + "
                            "backward and a small vector SiT train step against unfused (JSON)")
    samplers.add_arguments(bench)
    bench.set_defaults(fn=cmd_bench)
    demo = sub.add_parser("demo", help="train, sample, picture, quality and speed in a couple of minutes")
    demo.add_argument("--data", default="moons",
                      help=f"{', '.join(data_lib.TOYS)} or digits (checkerboard and 8gaussians need more --steps)")
    demo.add_argument("--steps", type=int, help="training steps (default: fits ~2 minutes on 2 CPU cores)")
    demo.add_argument("--cfg-scale", type=float, default=2.0, help="guidance for digits")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="auto")
    demo.add_argument("--out", help="output folder (default: a new temporary folder)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(fn=cmd_demo)
    for command in sub.choices.values():  # argparse shows no help for help-less options: give them their default
        for action in command._actions:
            if action.help is None and _shows_default(action):
                action.help = "(default: %(default)s)"
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or a usage error argparse has printed in one line (2)
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print(f"sit-ext {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as e:
        # User errors by category: bad values and names, unusable files and folders (named in the
        # message), a missing optional package. One line, not a traceback.
        message = " ".join(line.strip() for line in str(e).splitlines()) or type(e).__name__
        print(f"sit-ext {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
