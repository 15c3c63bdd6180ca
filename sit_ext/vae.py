"""The Stable Diffusion VAE (``diffusers.AutoencoderKL``, the optional extra
``sit_ext[vae]``): images to scaled latents and back, and ``encode_folder``,
a folder of images to the latent shards that ``sit-ext train`` reads.

The VAE comes from a local folder (``save_pretrained``'s layout, or a pipeline
folder with a ``vae/`` subfolder) or a Hub id already in the local Hugging Face
cache. Nothing is downloaded unless SIT_EXT_ALLOW_DOWNLOAD=1.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch
from torch import Tensor

from . import data as data_lib
from . import images as images_lib

FLIPS = ("both", "random", "none")


def _autoencoder_kl():
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ImportError("the VAE needs diffusers: pip install 'sit_ext[vae]' (or pip install diffusers "
                          "safetensors)") from None
    return AutoencoderKL


def _cached_snapshot(repo_id: str) -> str | None:
    """The local folder of a Hub id already in the Hugging Face cache, or None.
    Loading from it skips diffusers' hf_hub_download call, which passes
    huggingface_hub an argument it warns is deprecated, on every load."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except (ImportError, OSError, ValueError):  # not installed, not cached, not a Hub id
        return None


def load_vae(name_or_path: str, device: str | torch.device = "cpu"):
    """An AutoencoderKL in eval mode, float32, on `device`."""
    AutoencoderKL = _autoencoder_kl()
    download = os.environ.get("SIT_EXT_ALLOW_DOWNLOAD") == "1"

    def not_loaded(reason: str) -> FileNotFoundError:
        where = "a local folder or a Hub id in the local Hugging Face cache"
        hint = "" if download else " (downloads are off: set SIT_EXT_ALLOW_DOWNLOAD=1 to allow one)"
        return FileNotFoundError(f"cannot load the VAE {name_or_path!r} from {where}{hint}: {reason[:300]}")

    folder = name_or_path if os.path.isdir(name_or_path) else _cached_snapshot(name_or_path)
    if folder is None and not download:
        raise not_loaded("it is neither a folder nor in the cache")
    subfolder = None
    if folder is not None and not os.path.isfile(os.path.join(folder, "config.json")):
        if not os.path.isfile(os.path.join(folder, "vae", "config.json")):
            raise FileNotFoundError(f"VAE folder {folder!r} has neither config.json nor vae/config.json")
        subfolder = "vae"
    low_memory = importlib.util.find_spec("accelerate") is not None  # diffusers warns without it
    try:
        # torch_dtype here, not .to(dtype) below: diffusers warns about a cast after loading.
        vae = AutoencoderKL.from_pretrained(folder or name_or_path, subfolder=subfolder, local_files_only=not download,
                                            low_cpu_mem_usage=low_memory, torch_dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise not_loaded(str(e).splitlines()[0]) from None
    return vae.to(device=device).eval().requires_grad_(False)


def scaling_factor(vae) -> float:
    return float(vae.config.scaling_factor)


@torch.no_grad()
def encode(vae, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Images [N, 3, H, W] in [-1, 1] -> a sample of the latent distribution
    times the scaling factor (what the SiT is trained on)."""
    dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    return dist.sample(generator=generator) * scaling_factor(vae)


@torch.no_grad()
def decode(vae, latents: Tensor, batch_size: int = 32) -> Tensor:
    """Scaled latents -> images [N, 3, H, W], about [-1, 1], batch_size at a
    time (the decoder's activations are large)."""
    z = latents.to(vae.device, vae.dtype) / scaling_factor(vae)
    return torch.cat([vae.decode(chunk).sample for chunk in z.split(batch_size)])


def encode_folder(image_dir: str, vae_path: str, out: str, image_size: int = 256, batch_size: int = 32,
                  shard_size: int = 10_000, flip: str = "both", seed: int = 0, device: str | torch.device = "cpu",
                  progress: bool = True) -> dict:
    """Every image of `image_dir` (class subfolders give labels), center-cropped
    to image_size, through the VAE, into latent shards in `out`. flip="both"
    stores each image and its mirror image (every epoch then sees both, as the
    official recipe's random flip does on average), "random" one of the two
    (fast-DiT's feature extraction), "none" the image alone. Returns the index."""
    if flip not in FLIPS:
        raise ValueError(f"flip (--flip) must be one of {FLIPS}, got {flip!r}")
    for name, value in (("image_size", image_size), ("batch_size", batch_size), ("shard_size", shard_size)):
        if value < 1:
            raise ValueError(f"{name} (--{name.replace('_', '-')}) must be >= 1, got {value}")
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed (--seed) must be in [0, 2**31), got {seed}")
    paths, labels, classes = images_lib.list_image_folder(image_dir)
    vae = load_vae(vae_path, device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)  # the VAE's downsampling
    if image_size % factor:
        raise ValueError(f"image_size (--image-size) must be a multiple of {factor} (the VAE's downsampling "
                         f"factor), got {image_size}: the latents would stand for a "
                         f"{image_size // factor * factor}-pixel image")
    meta = {"vae": vae_path, "scaling_factor": scaling_factor(vae), "image_size": image_size, "flip": flip,
            "source": os.path.abspath(image_dir), "classes": classes,
            "num_classes": len(classes) if labels is not None else None}
    writer = data_lib.LatentShardWriter(out, shard_size, meta)
    gen = torch.Generator(vae.device).manual_seed(seed)
    coin = np.random.default_rng(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), desc="encode", unit="img", dynamic_ncols=True)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        x = images_lib.from_uint8(np.stack([images_lib.read_image(p, image_size) for p in chunk]))
        y = torch.tensor(labels[start : start + len(chunk)]) if labels is not None else None
        if flip == "both":  # each image followed by its mirror image
            x = torch.stack([x, x.flip(-1)], 1).flatten(0, 1)
            y = y.repeat_interleave(2) if y is not None else None
        elif flip == "random":
            mirror = torch.from_numpy(coin.random(len(x)) < 0.5)
            x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
        writer.add(encode(vae, x, gen).float().cpu(), y)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return writer.close()
