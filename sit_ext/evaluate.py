"""Sample quality. ``frechet_distance`` between two feature sets (FID when the
features are Inception's; the digits demo uses its classifier's), and
``evaluate_images``: FID, Inception Score, precision and recall of uint8
images through torch-fidelity's InceptionV3, the port of the TensorFlow FID
network (the optional extra ``sit_ext[eval]``), with weights from a local file.
torch-fidelity has no sFID, so none is reported.
"""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import torch
from torch import Tensor

from ._io import torch_load

FEATURE_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's name for the TF-compatible InceptionV3
PRC_NEIGHBORHOOD = 3  # k of the k-NN balls of precision and recall (torch-fidelity's default)
FEW_IMAGES = 2048  # the pool features' size: with fewer images a side's covariance is singular


def few_images_warning(samples: int, ref: int) -> str | None:
    """A one-line warning when either side has too few images for a meaningful FID, else None."""
    if min(samples, ref) >= FEW_IMAGES:
        return None
    return (f"FID from {samples} samples against {ref} reference images: below {FEW_IMAGES} images on a side (the "
            "feature size) the covariance is singular and the FID is biased upward; only FID-50K (50,000 samples "
            "against the reference batch) is comparable to published figures")


def _as_features(feats, name: str) -> Tensor:
    f = torch.as_tensor(np.asarray(feats.detach().cpu() if isinstance(feats, Tensor) else feats), dtype=torch.float64)
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"{name}: expected features [N >= 2, D], got {list(f.shape)}")
    if not torch.isfinite(f).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return f


def frechet_distance(feats_a, feats_b) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between the
    Gaussians fitted to two feature sets [N, D] (tensors or arrays; unbiased
    covariances, as np.cov), in float64.

    With A, B the centred features over sqrt(N - 1), S_a = A^T A and S_b =
    B^T B, and tr (S_a S_b)^(1/2) is the sum of the singular values of A B^T
    [N_a, N_b] (the nonzero eigenvalues of A^T A B^T B are those of
    (A B^T)(A B^T)^T): used when that matrix is the smaller. Otherwise it is
    the sum of the square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2)
    [D, D]. Both are symmetric routes: no complex square roots."""
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    d = a.shape[1]
    diff = a.mean(0) - b.mean(0)
    A = (a - a.mean(0)) / math.sqrt(len(a) - 1)
    B = (b - b.mean(0)) / math.sqrt(len(b) - 1)
    if len(a) * len(b) <= d * d:
        tr_sqrt = torch.linalg.svdvals(A @ B.T).sum()
    else:
        cov_a, cov_b = A.T @ A, B.T @ B
        w, v = torch.linalg.eigh(cov_a)
        root_a = (v * w.clamp_min(0).sqrt()) @ v.T
        inner = root_a @ cov_b @ root_a
        tr_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    return float(diff @ diff + A.square().sum() + B.square().sum() - 2 * tr_sqrt)


# ------------------------------------------------------------ torch-fidelity


def _torch_fidelity():
    try:
        import torch_fidelity
    except ImportError:
        raise ImportError("evaluation needs torch-fidelity: pip install 'sit_ext[eval]' (or pip install "
                          "torch-fidelity, with the torchvision that matches your torch)") from None
    return torch_fidelity


def read_weights(path: str) -> dict[str, Tensor]:
    """A state dict from .safetensors, or from a torch file loaded with
    weights_only=True (torch-fidelity's weights-inception-2015-12-05-*.pth)."""
    if path.endswith(".safetensors"):
        from .models import read_safetensors

        return read_safetensors(path)[0]
    state = torch_load(path, "feature weights")
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"feature weights {path!r} are not a state dict (names to tensors)")
    return state


def inception(weights: str, device: str | torch.device = "cpu"):
    """torch-fidelity's InceptionV3, giving the 2048-d pool features and the
    unbiased logits, with `weights` read as read_weights does. torch-fidelity
    unpickles its weights file without restrictions, so it gets a temporary
    file of the tensors read here, never the user's file."""
    tf = _torch_fidelity()
    state = read_weights(weights)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "inception.pth")
        torch.save(state, path)
        try:
            net = tf.FeatureExtractorInceptionV3(FEATURE_EXTRACTOR, ["2048", "logits_unbiased"],
                                                 feature_extractor_weights_path=path)
        except RuntimeError as e:  # load_state_dict: missing, unexpected or mis-shaped entries
            raise ValueError(f"feature weights {weights!r} do not fit torch-fidelity's InceptionV3: "
                             f"{str(e).splitlines()[0][:300]}") from None
    return net.to(device)


@torch.no_grad()
def inception_features(net, images: np.ndarray, batch_size: int = 64, progress: bool = True,
                       desc: str = "features") -> tuple[Tensor, Tensor]:
    """(pool features [N, 2048], unbiased logits [N, 1008]) of uint8 images [N, H, W, 3]."""
    from tqdm.auto import tqdm

    device = next(net.parameters()).device
    pools, logits = [], []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, dynamic_ncols=True):
        # A writable C-contiguous batch: a memory-mapped .npz is read-only, and torch warns on wrapping one.
        x = torch.from_numpy(np.require(images[start : start + batch_size], requirements=["C", "W"]))
        x = x.permute(0, 3, 1, 2)
        pool, logit = net(x.to(device))
        pools.append(pool.double())
        logits.append(logit.double())
    return torch.cat(pools), torch.cat(logits)


def evaluate_images(net, samples: np.ndarray, ref: np.ndarray, batch_size: int = 64, progress: bool = True) -> dict:
    """FID (through frechet_distance), Inception Score of `samples`
    (torch-fidelity's, over 10 splits, fewer for under 20 images), and
    precision and recall of samples against ref (torch-fidelity's k-NN balls,
    k = 3). `net` is inception()'s; both inputs are uint8 [N, H, W, 3], arrays
    or what images.read_images gives (memory-mapped, or read when sliced)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    for name, images in (("samples", samples), ("ref", ref)):
        if len(images) <= PRC_NEIGHBORHOOD:
            raise ValueError(f"{name}: {len(images)} images; evaluation needs more than {PRC_NEIGHBORHOOD}")
    pool_s, logits_s = inception_features(net, samples, batch_size, progress, "samples")
    pool_r, _ = inception_features(net, ref, batch_size, progress, "ref")
    isc = isc_features_to_metric(logits_s.cpu(), splits=max(1, min(10, len(samples) // 2)), shuffle=True, rng_seed=2020)
    precision, recall = calculate_precision_recall_part(pool_s.float(), pool_r.float(), PRC_NEIGHBORHOOD)
    return {"fid": frechet_distance(pool_s, pool_r), "inception_score": isc[KEY_METRIC_ISC_MEAN],
            "inception_score_std": isc[KEY_METRIC_ISC_STD], "precision": precision, "recall": recall,
            "samples": len(samples), "ref": len(ref), "feature_extractor": f"torch-fidelity {FEATURE_EXTRACTOR}"}
