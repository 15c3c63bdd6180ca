"""Training: model construction from data, EMA, atomic checkpoints with every
RNG state, bit-exact resume, and torchrun DistributedDataParallel.

Checkpoints hold only tensors and plain Python values and are always loaded
with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import data as data_lib
from ._io import FileFormatError, first_line, torch_load
from .cuda_graphs import CapturedTrainStep, check_device
from .models import SiT, SiT_models
from .transport import Transport


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or for another model."""


class TrainingInterrupted(Exception):
    """Ctrl-C during training, raised at the end of the step it came in, after
    a checkpoint was written (single process) or not (see `checkpoint`)."""

    def __init__(self, step: int, checkpoint: str | None):
        super().__init__(f"interrupted at step {step}")
        self.step, self.checkpoint = step, checkpoint


@dataclass
class TrainConfig:
    data: str = "checkerboard"
    data_size: int = 50_000
    model: str | None = None  # "vector", or a preset such as "SiT-S/2" for image data; None: by the data
    hidden_size: int | None = None
    depth: int | None = None
    heads: int | None = None
    patch_size: int | None = None
    class_dropout_prob: float = 0.1
    path: str = "linear"
    prediction: str = "velocity"
    loss_weight: str | None = None
    train_eps: float | None = None
    sample_eps: float | None = None
    time_sampler: str = "uniform"
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 256
    steps: int = 1000
    grad_clip: float | None = None
    ema_decay: float = 0.9999
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32" or "bf16"
    compile: bool = False
    cuda_graph: bool = False  # one CUDA graph per step: forward, loss, backward, clipping, AdamW
    fused: bool = True
    seed: int = 0
    out: str = "runs/sit"
    ckpt_every: int = 500
    log_every: int = 10
    device: str = "auto"

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def for_data(cls, data: str, **given) -> TrainConfig:
        """The defaults, then those of a built-in data set (DATA_DEFAULTS), then `given`."""
        return cls(**{"data": data, **DATA_DEFAULTS.get(data, {}), **given})

    def check(self) -> None:
        """ValueError naming the field (and its flag) for a value that would
        train to a wrong result without a word: a negative --grad-clip climbs
        the loss, an --ema-decay outside [0, 1] makes the EMA explode."""
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"{name} (--{name.replace('_', '-')}) must be {expected}, got {getattr(self, name)!r}")

        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", "a finite number > 0")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise bad("weight_decay", "a finite number >= 0")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise bad("grad_clip", "a finite number > 0 (omit it for no clipping)")
        if not 0 <= self.ema_decay <= 1:
            raise bad("ema_decay", "in [0, 1]")
        if not 0 <= self.seed < 2**31:
            raise bad("seed", "in [0, 2**31)")


# Defaults for the built-in data that learn in minutes on a CPU (the demo's settings).
_TOY_DEFAULTS = {"model": "vector", "hidden_size": 128, "depth": 4, "heads": 4, "lr": 1e-3, "batch_size": 512,
                 "steps": 1200, "ema_decay": 0.995}
DATA_DEFAULTS = {**{name: _TOY_DEFAULTS for name in data_lib.TOYS},
                 "digits": {**_TOY_DEFAULTS, "model": "SiT-S/2", "patch_size": 2, "batch_size": 256,
                            "steps": 1500}}
# What a resumed run may change: how long it runs, where and how fast. Every
# other field defines the run and comes from its checkpoint.
RUNTIME_FIELDS = ("steps", "out", "ckpt_every", "log_every", "device", "compile", "cuda_graph", "fused")


def resume_config(saved: TrainConfig, given: dict, source: str) -> TrainConfig:
    """The config of a resumed run: the saved one, with the runtime fields in
    `given` applied; a run-defining field in `given` that differs from the
    saved value is an error naming its flag."""
    for name, value in given.items():
        if name not in RUNTIME_FIELDS and value != getattr(saved, name):
            raise ValueError(f"--{name.replace('_', '-')} {value} conflicts with the run being resumed "
                             f"({getattr(saved, name)} in {source}): drop the flag to continue that run, "
                             "or start a new run in another --out")
    return dataclasses.replace(saved, **{k: v for k, v in given.items() if k in RUNTIME_FIELDS})


# ------------------------------------------------------------------ pieces


def model_name(cfg: TrainConfig, ds: data_lib.Dataset) -> str:
    """The model a run builds: cfg.model, or by the data when it is None
    (SiT-S/2 for image data, else the vector model). A run saved before the
    default followed the data holds "vector" for image data, and built SiT-S/2."""
    if cfg.model is None or (cfg.model == "vector" and ds.kind == "image"):
        return "SiT-S/2" if ds.kind == "image" else "vector"
    return cfg.model


def build_model(cfg: TrainConfig, ds: data_lib.Dataset) -> SiT:
    """The SiT for a data set: a preset (with size overrides) for images, the
    vector model otherwise."""
    name = model_name(cfg, ds)
    if name != "vector" and name not in SiT_models:
        raise ValueError(f"unknown model {name!r} (--model): choose 'vector' or one of {sorted(SiT_models)}")
    if ds.kind == "image":
        _, channels, height, width = ds.x.shape
        if height != width:
            raise data_lib.DataError(f"image data must be square, got {height}x{width}")
        overrides = {k: v for k, v in (("hidden_size", cfg.hidden_size), ("depth", cfg.depth),
                                       ("num_heads", cfg.heads), ("patch_size", cfg.patch_size)) if v is not None}
        return SiT_models[name](input_size=height, in_channels=channels, num_classes=ds.num_classes,
                                learn_sigma=False, class_dropout_prob=cfg.class_dropout_prob, **overrides)
    if name != "vector":
        raise ValueError(f"model {name!r} is for image data; {ds.name} is {ds.kind} data: use --model vector")
    def given(value, default):
        return default if value is None else value

    return SiT.build(ds.x.shape[-1], hidden_size=given(cfg.hidden_size, 256), num_layers=given(cfg.depth, 6),
                     num_heads=given(cfg.heads, 4), num_classes=ds.num_classes,
                     class_dropout_prob=cfg.class_dropout_prob, max_seq_len=ds.x.shape[1] if ds.x.dim() == 3 else 1)


def unused_settings(cfg: TrainConfig, ds: data_lib.Dataset, given) -> tuple[list[str], list[str]]:
    """(refusals, warnings) for the fields in `given` (the flags a user set)
    that this run would not use: each names its flag, and says where the
    official code ignores it too."""
    refuse, warn = [], []
    velocity_on_linear = cfg.prediction == "velocity" and cfg.path in ("linear", "cosine", "gvp")
    if "train_eps" in given and velocity_on_linear:
        refuse.append(f"--train-eps has no effect with --path {cfg.path} and velocity prediction, which train on "
                      "all of [0, 1] (the official code ignores it there too): drop it")
    if "sample_eps" in given and velocity_on_linear:
        warn.append(f"--sample-eps is used with --path {cfg.path} and velocity prediction only by SDE sampling "
                    "with --diffusion-form SBDM or --last-step-size 0; the ODE and the other SDE settings ignore "
                    "it, as the official code does")
    if "loss_weight" in given and cfg.prediction == "velocity":
        refuse.append("--loss-weight weights the noise and score losses; velocity prediction is unweighted (the "
                      "official code ignores it too): drop it, or pass --prediction noise or score")
    if "class_dropout_prob" in given and ds.num_classes is None:
        refuse.append(f"--class-dropout-prob drops class labels for guidance, and {ds.name} has no labels: drop it")
    if "patch_size" in given and ds.kind != "image":
        refuse.append(f"--patch-size cuts images into patches; {ds.name} is {ds.kind} data, which the vector "
                      "model reads whole: drop it")
    if "data_size" in given and cfg.data not in data_lib.TOYS:
        refuse.append(f"--data-size is how many points a 2-D toy draws; {ds.name} is read whole: drop it")
    if given.get("model") == "vector" and ds.kind == "image":
        refuse.append(f"--model vector is for points and vectors; {ds.name} holds images or latents "
                      f"{list(ds.x.shape[1:])}: pass an image preset such as --model SiT-S/2 (the default for "
                      "image data)")
    return refuse, warn


def describe_run(cfg: TrainConfig, ds: data_lib.Dataset, model: nn.Module, device: torch.device, bf16: bool,
                 step: int) -> str:
    """The line train prints before its progress bar."""
    n_params = sum(p.numel() for p in model.parameters())
    labels = f", {ds.num_classes} classes" if ds.num_classes is not None else ""
    where = f"resumed at step {step} of {cfg.steps}" if step else f"{cfg.steps} steps"
    name = model_name(cfg, ds)
    name = "the vector SiT" if name == "vector" else name
    return (f"sit-ext train: {name} ({n_params / 1e6:.2f} M parameters) on {ds.name} "
            f"[{len(ds.x)} x {' x '.join(map(str, ds.x.shape[1:]))}{labels}], {device}, "
            f"{'bf16 autocast' if bf16 else 'fp32'}, {'fused kernels' if cfg.fused else 'unfused (plain PyTorch)'}"
            f"{', torch.compile' if cfg.compile else ''}{', CUDA graph' if cfg.cuda_graph else ''}; {where}; "
            f"out {cfg.out}")


def make_transport(cfg: TrainConfig) -> Transport:
    return Transport(cfg.path, cfg.prediction, cfg.loss_weight, cfg.train_eps, cfg.sample_eps, cfg.time_sampler)


def _set_capturable(optimizer: torch.optim.Optimizer, capturable: bool, device: torch.device) -> None:
    """A loaded optimizer state takes the saved capturable flag: set this run's,
    with the step counts where a captured step keeps them (on the device)."""
    for group in optimizer.param_groups:
        group["capturable"] = capturable
    if capturable:
        for state in optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].to(device, torch.float32)


def ema_decay_at(step: int, decay: float) -> float:
    """The EMA decay for the update after `step` steps: warmed up as
    (1 + step) / (10 + step) until that reaches `decay`, so that an early
    sample from the EMA is not the initial weights."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


class ShardedBatches:
    """Random batches of indices, resumable. Each epoch draws one permutation
    from seed + epoch, the same on every rank, and rank r takes every
    world-th index from r (DistributedSampler's scheme); batches run on across
    epoch ends."""

    def __init__(self, n: int, batch: int, rank: int = 0, world: int = 1, seed: int = 0):
        if n < world:
            raise data_lib.DataError(f"{n} samples cannot be shared by {world} processes")
        self.n, self.batch, self.rank, self.world, self.seed = n, batch, rank, world, seed
        self.epoch, self.offset = 0, 0
        self._shard: torch.Tensor | None = None

    def _current(self) -> torch.Tensor:
        if self._shard is None:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
            self._shard = perm[self.rank :: self.world]
        return self._shard

    def next(self) -> torch.Tensor:
        parts, need = [], self.batch
        while need:
            shard = self._current()
            take = shard[self.offset : self.offset + need]
            parts.append(take)
            need -= len(take)
            self.offset += len(take)
            if self.offset >= len(shard):
                self.epoch, self.offset, self._shard = self.epoch + 1, 0, None
        return torch.cat(parts)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset, self._shard = int(state["epoch"]), int(state["offset"]), None


def rng_state() -> dict:
    """Every RNG this process uses, as tensors and plain values."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [list(v) if isinstance(v, tuple) else v for v in random.getstate()],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ------------------------------------------------------------- checkpoints


def save_checkpoint(path: str, state: dict) -> None:
    """Writes a temporary file and renames it over `path`: a crash mid-write
    leaves the previous checkpoint intact."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(directory: str, name: str = "latest.pt") -> list[str]:
    """Removes what save_checkpoint writes before its rename (`.NAME.PID.tmp`),
    left behind by a process killed mid-write. Call it before a run starts."""
    stale = [f for f in os.listdir(directory) if f.startswith(f".{name}.") and f.endswith(".tmp")]
    for f in stale:
        os.remove(os.path.join(directory, f))
    return stale


def load_checkpoint(path: str) -> dict:
    """A sit_ext training checkpoint, loaded without running code from it."""
    if os.fspath(path).endswith(".safetensors"):
        raise CheckpointError(f"{path!r} is an export (weights only, no optimizer or data order): train and resume "
                              "from the run's latest.pt; sample and from_pretrained read exports")
    try:
        ckpt = torch_load(path, "checkpoint")
    except (FileNotFoundError, IsADirectoryError, FileFormatError) as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(ckpt, dict) or not {"model", "config", "step"} <= set(ckpt):
        raise CheckpointError(f"{path!r} is not a sit_ext training checkpoint (it holds a {type(ckpt).__name__} "
                              "without model, config and step)")
    problem = _checkpoint_problem(ckpt)
    if problem:
        raise CheckpointError(f"checkpoint {path!r} is damaged: {problem}")
    return ckpt


# TrainConfig fields that are sizes or counts (None: the data's or model's default).
_POSITIVE_FIELDS = ("data_size", "hidden_size", "depth", "heads", "patch_size", "batch_size", "steps",
                    "ckpt_every", "log_every")


_TYPE_CHECKS = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
                "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                "str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool),
                "None": lambda v: v is None}


def _config_problem(config) -> str | None:
    """What is wrong with a saved TrainConfig dict: a value not of its
    field's annotated type ("int | None", ...), or a size below 1."""
    if not isinstance(config, dict):
        return f"its config is a {type(config).__name__}, not a dict"
    for f in dataclasses.fields(TrainConfig):
        value = config.get(f.name, f.default)
        if not any(_TYPE_CHECKS[kind](value) for kind in f.type.split(" | ")):
            return f"config {f.name} is {value!r}, expected {f.type}"
        if f.name in _POSITIVE_FIELDS and value is not None and value < 1:
            return f"config {f.name} is {value!r}, not a size >= 1"
    return None


def _checkpoint_problem(ckpt: dict) -> str | None:
    step = ckpt["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"step is {step!r}"
    problem = _config_problem(ckpt["config"])
    if problem:
        return problem
    for name in ("model", "ema"):
        state = ckpt.get(name, {})
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                  for k, v in state.items()):
            return f"its {name} weights are not a dict of names to tensors"
    data = ckpt.get("data")
    if data is not None:
        shape = data.get("shape") if isinstance(data, dict) else None
        if not isinstance(data, dict) or (shape is not None and not (
                isinstance(shape, list) and shape and all(isinstance(n, int) and n >= 1 for n in shape))):
            return f"its data record {data!r} is not a dict with a shape of positive sizes"
    return None


def load_weights(model: nn.Module, state: dict, what: str) -> None:
    """load_state_dict with a clear error when the checkpoint is for another
    model, or holds NaN or infinite weights."""
    own = model.state_dict()
    bad = sorted(k for k in own if k not in state or state[k].shape != own[k].shape)
    extra = sorted(k for k in state if k not in own)
    if bad or extra:
        raise CheckpointError(f"{what} does not fit this model: {len(bad)} missing or mis-shaped entries "
                              f"({', '.join(bad[:5])}), {len(extra)} unexpected ({', '.join(extra[:5])})")
    diverged = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if diverged:
        raise CheckpointError(f"{what} hold NaN or infinite values ({', '.join(diverged[:3])}): the run diverged "
                              "before this checkpoint; use an earlier one")
    model.load_state_dict(state)


# --------------------------------------------------------------- training


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank), initialising the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" (this rank's GPU, else the CPU), "cpu", "cuda" or "cuda:N"; a
    ValueError naming --device for anything else or a GPU that is not here."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} usable CUDA devices")
    return device


class _DeferredInterrupt:
    """Turns the first Ctrl-C into a flag the training loop reads between
    steps (a second one interrupts at once). Only in the main thread."""

    def __init__(self):
        self.requested, self._previous = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _trim_log(path: str, step: int) -> None:
    """Drops the log lines past `step` (written after the checkpoint a run
    resumes from), and any line that is not a whole record: a process killed
    while writing one leaves it cut short."""
    if not os.path.exists(path):
        return

    def kept(line: str) -> bool:
        try:
            record = json.loads(line)
        except ValueError:
            return False
        return isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step

    with open(path) as f:
        lines = [line if line.endswith("\n") else line + "\n" for line in f if kept(line)]
    with open(path, "w") as f:
        f.writelines(lines)


def train(cfg: TrainConfig | None, resume: str | None = None, progress: bool = True,
          log: Callable[[str], None] = print, overwrite: bool = False, given: dict | None = None,
          warn: Callable[[str], None] | None = None) -> dict:
    """Trains per `cfg`; returns a summary (steps, last loss, checkpoint, timing).

    given: the fields the user set (the CLI's flags). resume: a checkpoint to
    continue; its config defines the run, merged with `given` by resume_config
    (cfg's RUNTIME_FIELDS without it; cfg may then be None). Without resume,
    a cfg.out that already holds a run is refused unless overwrite=True, and a
    field in `given` that the run would not use is refused, or passed to `warn`
    (default: warnings.warn) where it is used in part. `log` gets the header
    line (model, data, device, precision). Ctrl-C ends the step under way,
    writes a checkpoint and raises TrainingInterrupted."""
    ckpt = load_checkpoint(resume) if resume else None
    if ckpt is not None:
        runtime = {name: getattr(cfg, name) for name in RUNTIME_FIELDS} if given is None else given
        cfg = resume_config(TrainConfig.from_dict(ckpt["config"]), runtime, resume)
    rank, world, local_rank = _distributed()
    device = resolve_device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    existing = os.path.join(cfg.out, "latest.pt")
    if ckpt is not None:
        if cfg.steps <= int(ckpt["step"]):
            raise ValueError(f"{resume} is already at step {ckpt['step']}: --steps {cfg.steps} leaves nothing to "
                             f"train; pass a larger --steps to continue")
        if os.path.exists(existing) and not os.path.samefile(existing, resume):
            raise ValueError(f"--out {cfg.out} holds another run (latest.pt), which continuing {resume} there would "
                             "replace: choose another --out")
    elif not overwrite and os.path.exists(existing):
        raise ValueError(f"--out {cfg.out} already holds a run (latest.pt): pass --resume to continue it, "
                         "--overwrite to start it again, or another --out")
    cfg.check()
    if cfg.cuda_graph:
        if cfg.compile:
            raise ValueError("--cuda-graph and --compile each capture the step: choose one")
        if world > 1:
            raise ValueError("--cuda-graph runs one process: under torchrun the gradient all-reduce is not captured")
        check_device(device, "--cuda-graph")
    torch.manual_seed(cfg.seed + rank)  # per-rank noise and times; the data order is shared
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)

    ds = data_lib.load(cfg.data, cfg.data_size, seed=cfg.seed)
    cfg = dataclasses.replace(cfg, model=model_name(cfg, ds))  # the config records the preset built
    model = build_model(cfg, ds).to(device)
    model.fused = cfg.fused
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  capturable=cfg.cuda_graph)
    transport = make_transport(cfg)  # refuses unknown values first
    if ckpt is None and given is not None:
        refuse, partly = unused_settings(cfg, ds, given)
        if refuse:
            raise ValueError(refuse[0])
        for message in partly:
            (warn or warnings.warn)(message)
    batches = ShardedBatches(len(ds.x), cfg.batch_size, rank, world, cfg.seed)
    step = 0
    if ckpt is not None:
        missing = [k for k in ("ema", "opt", "sampler", "rng") if k not in ckpt]
        if missing:
            raise CheckpointError(f"{resume!r} cannot be resumed: it holds no {', '.join(missing)} (a training "
                                  "checkpoint has them; an export holds weights only)")
        load_weights(model, ckpt["model"], "the checkpoint's model weights")
        load_weights(ema, ckpt["ema"], "the checkpoint's EMA weights")
        try:
            optimizer.load_state_dict(ckpt["opt"])
            batches.load_state_dict(ckpt["sampler"])
            set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:  # what a damaged state raises
            raise CheckpointError(f"{resume!r} is damaged: cannot restore its optimizer, data order and random "
                                  f"state ({first_line(e)})") from None
        step = int(ckpt["step"])
        _set_capturable(optimizer, cfg.cuda_graph, device)

    runner: nn.Module = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        runner = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if ckpt is None:  # DDP gave every rank rank 0's initial weights: the EMA starts from them too
            ema.load_state_dict(model.state_dict())
    if cfg.compile:
        runner = torch.compile(runner)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    # a captured step casts the weights inside the graph: no cast cache kept across replays
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=not cfg.cuda_graph)

    x_all = ds.x.to(device)
    labels = ds.labels.to(device) if ds.labels is not None else None
    log_path = os.path.join(cfg.out, "log.jsonl")
    ckpt_path = os.path.join(cfg.out, "latest.pt")
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        remove_stale_temporaries(cfg.out)
        if ckpt is not None:
            _trim_log(log_path, step)
        elif os.path.exists(log_path):
            os.remove(log_path)  # a run started again (overwrite=True) logs afresh
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
    if rank == 0:
        log(describe_run(cfg, ds, model, device, bf16, step))
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="train", dynamic_ncols=True)

    def checkpoint() -> None:
        rngs = [rng_state()]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state())
        if rank == 0:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "ema": ema.state_dict(), "opt": optimizer.state_dict(),
                "step": step, "config": dataclasses.asdict(cfg), "sampler": batches.state_dict(), "rng": rngs,
                "ema_warmup": True,
                "data": {"name": ds.name, "kind": ds.kind, "shape": list(ds.x.shape[1:]),
                         "num_classes": ds.num_classes},
            })

    def losses(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        with autocast:
            terms = transport.training_losses(runner, x, model_kwargs={"y": y} if y is not None else None)
        return terms["loss"].mean()

    def eager_step(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        loss = losses(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        return loss

    model.train()
    train_step: Callable[..., torch.Tensor] = eager_step
    first_step, last_loss, t_start, steps_done = step, float("nan"), time.perf_counter(), 0
    window_start, window_steps = time.perf_counter(), 0
    # One process: the first Ctrl-C ends the step under way and checkpoints. Under torchrun the ranks
    # could stop at different steps and hang in a collective, so there Ctrl-C interrupts at once.
    with _DeferredInterrupt() if world == 1 else contextlib.nullcontext() as interrupt:
        while step < cfg.steps and not (interrupt and interrupt.requested):
            idx = batches.next().to(device)
            inputs = (x_all[idx],) if labels is None else (x_all[idx], labels[idx])
            if cfg.cuda_graph and train_step is eager_step:  # captured on the first batch
                train_step = CapturedTrainStep(losses, list(model.parameters()), optimizer, inputs,
                                               cfg.grad_clip, what="--cuda-graph")
            loss = train_step(*inputs)
            update_ema(ema, model, ema_decay_at(step, cfg.ema_decay))
            step, steps_done, window_steps = step + 1, steps_done + 1, window_steps + 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                value = loss.detach().float()
                if world > 1:
                    dist.all_reduce(value)
                    value /= world
                last_loss = value.item()
                rate = window_steps / max(time.perf_counter() - window_start, 1e-9)
                window_start, window_steps = time.perf_counter(), 0
                if rank == 0:
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"step": step, "loss": last_loss, "it_s": rate, "lr": cfg.lr}) + "\n")
                    if bar is not None:
                        bar.set_postfix(loss=f"{last_loss:.4f}", it_s=f"{rate:.1f}")
            if bar is not None:
                bar.update(1)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                checkpoint()
        if bar is not None:
            bar.close()
        if interrupt and interrupt.requested:
            checkpoint()
            raise TrainingInterrupted(step, ckpt_path)
    elapsed = time.perf_counter() - t_start
    if world > 1:
        dist.barrier()
    return {"steps": step, "first_step": first_step, "steps_done": steps_done, "loss": last_loss,
            "checkpoint": ckpt_path, "seconds": elapsed,
            "it_s": steps_done / max(elapsed, 1e-9), "rank": rank, "world": world,
            "model": model, "ema": ema, "data": ds, "transport": transport, "config": cfg}
