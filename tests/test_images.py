"""Latents in, pictures out, all offline: a tiny AutoencoderKL built from a
config (random weights) and a few random images in two class folders go through
encode -> train -> export -> sample --vae -> evaluate on the CPU. The Fréchet
distance is checked against scipy. Tests that need torch-fidelity (which needs
torchvision) skip without it."""

import importlib.util
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from sit_ext import cli, evaluate, training
from sit_ext import data as data_lib
from sit_ext import images as images_lib

TINY_SIT = ["--model", "SiT-S/2", "--hidden-size", "32", "--depth", "1", "--heads", "2", "--batch-size", "4",
            "--device", "cpu", "--quiet"]
SAMPLE = ["--steps", "2", "--solver", "euler", "--device", "cpu", "--quiet"]


def run_cli(*args):
    return cli.main([str(a) for a in args])


# ------------------------------------------------------------ Fréchet distance


def test_frechet_distance_matches_scipy_on_gaussians():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    d = 6
    mix_a, mix_b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    a = rng.standard_normal((500, d)) @ mix_a + rng.standard_normal(d)
    b = rng.standard_normal((400, d)) @ mix_b + rng.standard_normal(d)

    def direct(x, y):  # the textbook formula, with scipy's matrix square root
        mu, s1, s2 = x.mean(0) - y.mean(0), np.cov(x, rowvar=False), np.cov(y, rowvar=False)
        return mu @ mu + np.trace(s1 + s2 - 2 * scipy_linalg.sqrtm(s1 @ s2).real)

    assert evaluate.frechet_distance(a, b) == pytest.approx(direct(a, b), rel=1e-9)
    assert evaluate.frechet_distance(torch.from_numpy(b), a) == pytest.approx(direct(a, b), rel=1e-9)
    # Fewer samples than features (the [N_a, N_b] route): singular covariances, so the eigenvalues of S_a S_b
    # (torch-fidelity's formula) stand in for scipy's sqrtm.
    few_a, few_b = rng.standard_normal((20, 40)) @ rng.standard_normal((40, 40)), rng.standard_normal((30, 40)) + 1

    def by_eigenvalues(x, y):
        mu, s1, s2 = x.mean(0) - y.mean(0), np.cov(x, rowvar=False), np.cov(y, rowvar=False)
        return mu @ mu + np.trace(s1 + s2) - 2 * np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum()

    assert evaluate.frechet_distance(few_a, few_b) == pytest.approx(by_eigenvalues(few_a, few_b), rel=1e-6)
    assert abs(evaluate.frechet_distance(few_a, few_a)) < 1e-9 * np.trace(np.cov(few_a, rowvar=False))
    # Known Gaussians: one set against itself is 0; shifted by c, it is |c|^2 (the covariances cancel).
    shift = rng.standard_normal(d)
    assert abs(evaluate.frechet_distance(a, a)) < 1e-9
    assert evaluate.frechet_distance(a, a + shift) == pytest.approx(shift @ shift, rel=1e-9)
    # Diagonal covariances: |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2, up to sampling error.
    sa, sb = np.array([1.0, 2.0, 0.5]), np.array([0.5, 1.0, 3.0])
    x = rng.standard_normal((200_000, 3)) * sa
    y = rng.standard_normal((200_000, 3)) * sb + 1.0
    assert evaluate.frechet_distance(x, y) == pytest.approx(3.0 + ((sa - sb) ** 2).sum(), rel=0.01)


def test_frechet_distance_refuses_bad_features():
    good = np.zeros((5, 3))
    with pytest.raises(ValueError, match="feature sizes differ"):
        evaluate.frechet_distance(good, np.zeros((5, 4)))
    with pytest.raises(ValueError, match="N >= 2"):
        evaluate.frechet_distance(good, np.zeros((1, 3)))
    with pytest.raises(ValueError, match="NaN"):
        evaluate.frechet_distance(good, np.full((5, 3), np.nan))


def test_digits_frechet_distance_through_the_classifier_features():
    """The demo's figure: real digits are close to real digits and far from noise."""
    pytest.importorskip("sklearn")
    x, y = data_lib.load_digits()
    judge = data_lib.DigitClassifier(x[:600], y[:600], steps=10)
    assert judge.features(x[:7]).shape == (7, 10)
    real = evaluate.frechet_distance(judge.features(x[1000:1400]), judge.features(x[1400:]))
    noise = evaluate.frechet_distance(judge.features(torch.rand(400, 1, 8, 8) * 2 - 1), judge.features(x[1400:]))
    assert 0 <= real < 0.2 * noise


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=16,
                                  scaling_factor=0.5)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)  # config.json and diffusion_pytorch_model.safetensors
    return path


def test_vae_and_features_load_without_third_party_noise(vae_dir, tmp_path, monkeypatch, capfd):
    """No warning and nothing on stderr: diffusers' cast warning (a dtype given to .to() after
    loading), huggingface_hub's local_dir_use_symlinks warning (a Hub id from the cache), torch's
    "not writable" warning (features of a read-only, memory-mapped array)."""
    import warnings

    import huggingface_hub

    from sit_ext import vae as vae_lib

    snapshot = tmp_path / "hub" / "models--sit-ext--tiny-vae" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in os.listdir(vae_dir):
        (snapshot / f).write_bytes((vae_dir / f).read_bytes())
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    np.save(tmp_path / "images.npy", np.zeros((3, 8, 8, 3), np.uint8))
    read_only = np.load(tmp_path / "images.npy", mmap_mode="r")

    def net(x):
        assert x.dtype == torch.uint8 and x.shape == (2 if len(seen) == 0 else 1, 3, 8, 8)
        seen.append(x)
        return x.flatten(1).float(), x.flatten(1).float()[:, :4]

    seen = []
    net.parameters = lambda: iter([torch.zeros(1)])
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in (str(vae_dir), "sit-ext/tiny-vae"):
            vae = vae_lib.load_vae(name)
            assert next(vae.parameters()).dtype == torch.float32 and not vae.training
        pool, _ = evaluate.inception_features(net, read_only, batch_size=2, progress=False)
    assert pool.shape == (3, 192) and len(seen) == 2
    assert capfd.readouterr().err == ""
    with pytest.raises(FileNotFoundError, match="neither a folder nor in the cache"):
        vae_lib.load_vae("sit-ext/not-cached")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    sizes = {"cat": [(20, 24), (16, 16), (40, 36)], "dog": [(17, 33), (32, 32)]}  # (height, width)
    for name, shapes in sizes.items():
        (root / name).mkdir()
        for i, (h, w) in enumerate(shapes):
            ext = "jpg" if i == 1 else "png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name / f"{i}.{ext}")
    return root


@pytest.fixture(scope="module")
def latents(vae_dir, image_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents") / "lat"
    assert run_cli("encode", "--images", image_dir, "--vae", vae_dir, "--out", out, "--image-size", 16,
                   "--batch-size", 3, "--shard-size", 4, "--device", "cpu", "--quiet") == 0
    return out


@pytest.fixture(scope="module")
def exported(latents, tmp_path_factory):
    """A 2-step run on the latents, and its EMA weights as .safetensors in a folder of their own."""
    run = tmp_path_factory.mktemp("run")
    assert run_cli("train", "--data", latents, "--steps", 2, "--out", run, *TINY_SIT) == 0
    path = tmp_path_factory.mktemp("export") / "sit.safetensors"
    assert run_cli("export", "--ckpt", run / "latest.pt", "--out", path) == 0
    return run / "latest.pt", path


# ---------------------------------------------------------------------- VAE


def test_encode_writes_scaled_flipped_latents_in_shards(latents, vae_dir, image_dir):
    from sit_ext import vae as vae_lib

    index = json.loads((latents / "latents.json").read_text())
    assert index["count"] == 10 and index["shape"] == [4, 8, 8] and index["num_classes"] == 2
    assert index["classes"] == ["cat", "dog"] and index["scaling_factor"] == 0.5 and index["flip"] == "both"
    assert [s["count"] for s in index["shards"]] == [4, 4, 2]
    assert sorted(os.listdir(latents)) == ["labels-00000.npy", "labels-00001.npy", "labels-00002.npy",
                                           "latents-00000.npy", "latents-00001.npy", "latents-00002.npy",
                                           "latents.json"]
    ds = data_lib.load(str(latents))
    assert ds.x.shape == (10, 4, 8, 8) and ds.num_classes == 2 and ds.kind == "image"
    assert ds.labels.tolist() == [0] * 6 + [1] * 4  # ImageFolder order, each image then its mirror image
    # The same images, center-cropped, each followed by its mirror image, encoded in the same batches.
    paths, labels, _ = images_lib.list_image_folder(str(image_dir))
    assert labels == [0, 0, 0, 1, 1]
    x = images_lib.from_uint8(np.stack([images_lib.read_image(p, 16) for p in paths]))
    x = torch.stack([x, x.flip(-1)], 1).flatten(0, 1)
    vae = vae_lib.load_vae(str(vae_dir))
    gen = torch.Generator().manual_seed(0)
    expected = torch.cat([vae_lib.encode(vae, chunk, gen) for chunk in x.split(6)])
    assert torch.equal(ds.x, expected)
    # The scaling factor both ways, and decode(encode(x)) has the image's shape.
    z = vae_lib.encode(vae, x[:2], torch.Generator().manual_seed(1))
    with torch.no_grad():
        raw = vae.encode(x[:2]).latent_dist.sample(generator=torch.Generator().manual_seed(1))
        assert torch.equal(z, raw * 0.5)
        assert torch.equal(vae_lib.decode(vae, z), vae.decode(z / 0.5).sample)
    assert vae_lib.decode(vae, z).shape == x[:2].shape


def test_latent_shards_refuse_bad_values_and_labels(latents, tmp_path):
    import shutil

    def broken(name, change):
        folder = tmp_path / name
        shutil.copytree(latents, folder)
        change(folder)
        return str(folder)

    def write(file, value):
        return lambda folder: np.save(folder / file, value)

    nan = np.load(latents / "latents-00001.npy")
    nan[1, 2, 3, 4] = np.nan
    bad = {
        "nan": (write("latents-00001.npy", nan), "latents-00001.npy holds NaN"),
        "shape": (write("latents-00002.npy", np.zeros((3, 4, 8, 8), np.float32)), "latents-00002.npy holds"),
        "count": (write("labels-00000.npy", np.zeros(3, np.int64)), "labels-00000.npy has 3 labels for 4"),
        "fraction": (write("labels-00001.npy", np.full(4, 0.5)), "labels-00001.npy holds labels that are not"),
        "range": (write("labels-00002.npy", np.array([0, 2])), "labels-00002.npy holds labels >= 2"),
        "pickle": (write("labels-00000.npy", np.array([{}] * 4, dtype=object)), "labels-00000.npy"),
    }
    def index(**changes):
        def change(folder):
            saved = json.loads((folder / "latents.json").read_text())
            saved.update(changes)
            (folder / "latents.json").write_text(json.dumps(saved))
        return change

    # A damaged index once gave RuntimeError, KeyError or TypeError tracebacks (a negative
    # size reached torch.empty, a missing or None file name reached os.path.join).
    shard = {"latents": "latents-00000.npy", "labels": "labels-00000.npy", "count": 4}
    bad.update({
        "negative shape": (index(shape=[-4, 8, 8]), r"shape \[-4, 8, 8\] is not a list of positive integers"),
        "negative count": (index(shards=[{**shard, "count": -4}]), "shard 0 .* needs"),
        "no file name": (index(shards=[{"count": 4}]), "shard 0 .* needs a latents file name"),
        "a path": (index(shards=[{**shard, "latents": "/etc/passwd"}]), "shard 0 .* needs a latents file name"),
        "labels none": (index(shards=[{**shard, "labels": None}]), "shard 0 .* optionally a labels file name"),
        "not an object": (lambda folder: (folder / "latents.json").write_text("[1]"), "holds a list"),
        "huge shape": (index(shape=[10**6] * 3), r"latents-00000.npy holds float32 \[4, 4, 8, 8\]"),
        "no classes": (index(num_classes=0), "num_classes 0 is not a positive integer"),
    })
    for name, (change, message) in bad.items():
        with pytest.raises(data_lib.DataError, match=message):
            data_lib.load(broken(name, change))
    with pytest.raises(data_lib.DataError, match="already holds latents"):
        data_lib.LatentShardWriter(str(latents), 4, {})


def test_missing_extras_name_the_pip_extra(monkeypatch):
    from sit_ext import models
    from sit_ext import vae as vae_lib

    for module, call, extra in (("diffusers", lambda: vae_lib.load_vae("x"), "sit_ext[vae]"),
                                ("safetensors", lambda: models.read_safetensors("x.safetensors"), "sit_ext[vae]"),
                                ("torch_fidelity", evaluate._torch_fidelity, "sit_ext[eval]")):
        monkeypatch.setitem(sys.modules, module, None)
        with pytest.raises(ImportError, match=extra.replace("[", r"\[")):
            call()
        monkeypatch.undo()


def test_npz_is_written_in_chunks_and_memory_mapped(tmp_path):
    """write_npz streams chunks into ADM's layout; read_npz memory-maps an
    uncompressed arr_0 (its own and np.savez's) and reads a compressed one."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (37, 5, 7, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 37)
    path = str(tmp_path / "s.npz")
    images_lib.write_npz(path, (images[i : i + 10] for i in range(0, 37, 10)), images.shape, labels)
    with np.load(path, allow_pickle=False) as f:
        assert np.array_equal(f["arr_0"], images) and np.array_equal(f["labels"], labels)
    read = images_lib.read_npz(path)
    assert isinstance(read, np.memmap) and np.array_equal(read, images)
    np.savez(tmp_path / "numpy.npz", labels=labels, arr_0=images)  # arr_0 after another member
    read = images_lib.read_npz(str(tmp_path / "numpy.npz"))
    assert isinstance(read, np.memmap) and np.array_equal(read, images)
    np.savez_compressed(tmp_path / "small.npz", arr_0=images)
    read = images_lib.read_npz(str(tmp_path / "small.npz"))
    assert not isinstance(read, np.memmap) and np.array_equal(read, images)
    for chunks, fragment in (([images[:30]], "hold 30 images"), ([images, images[:1]], "more than the 37"),
                             ([images.astype(np.int16)], "int16")):
        with pytest.raises(ValueError, match=fragment):
            images_lib.write_npz(str(tmp_path / "bad.npz"), iter(chunks), images.shape)
        assert sorted(os.listdir(tmp_path)) == ["numpy.npz", "s.npz", "small.npz"]  # nothing half-written


def test_image_folder_is_read_when_sliced(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (5, 6, 4, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
        images_lib.save_png(str(tmp_path / f"c{i % 2}" / f"{i}.png"), image)
    reads = []
    read_image = images_lib.read_image
    monkeypatch.setattr(images_lib, "read_image", lambda p: reads.append(p) or read_image(p))
    folder = images_lib.read_images(str(tmp_path))
    assert reads == [] and len(folder) == 5 and folder.shape == (5, 6, 4, 3)
    order = [0, 2, 4, 1, 3]  # sorted by path: c0/0, c0/2, c0/4, c1/1, c1/3
    assert np.array_equal(folder[1:4], images[order[1:4]]) and len(reads) == 3
    assert np.array_equal(np.asarray(folder), images[order]) and folder[5:].shape == (0, 6, 4, 3)


def test_image_modes(tmp_path):
    """16-bit grey is scaled to 8 bits (Pillow's convert("RGB") clipped it at
    255); 32-bit and float pixels are refused (it made them 0 or 255)."""
    from PIL import Image

    rng = np.random.default_rng(5)
    grey16 = rng.integers(0, 65536, (12, 10), dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    image = images_lib.read_image(str(tmp_path / "grey16.png"))
    assert image.shape == (12, 10, 3) and image.dtype == np.uint8
    assert np.array_equal(image, np.repeat(np.rint(grey16 / 257.0).astype(np.uint8)[..., None], 3, axis=-1))
    rgb = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    for mode in ("P", "LA", "L", "RGBA"):  # 8-bit modes: Pillow's conversion, as torchvision's ImageFolder
        converted = Image.fromarray(rgb).convert(mode)
        converted.save(tmp_path / f"{mode}.png")
        read = images_lib.read_image(str(tmp_path / f"{mode}.png"))
        assert np.array_equal(read, np.asarray(converted.convert("RGB")))
    Image.fromarray(rng.integers(0, 1 << 20, (12, 10), dtype=np.int32)).save(tmp_path / "int32.tiff")
    Image.fromarray(rng.random((12, 10), dtype=np.float32)).save(tmp_path / "float.tiff")
    for name, fragment in (("int32.tiff", "32-bit"), ("float.tiff", "float")):
        with pytest.raises(data_lib.DataError, match=f"{name}: its pixels are {fragment}"):
            images_lib.read_image(str(tmp_path / name), 8)


def test_bad_image_input_is_one_line(tmp_path, vae_dir, capsys):
    def fails(*args, fragment):
        assert run_cli(*args) == 2
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err, err

    (tmp_path / "empty" / "cls").mkdir(parents=True)
    fails("encode", "--images", tmp_path / "empty", "--vae", vae_dir, "--out", tmp_path / "o", fragment="no images")
    (tmp_path / "one").mkdir()
    images_lib.save_png(str(tmp_path / "one" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    fails("encode", "--images", tmp_path / "one", "--vae", tmp_path / "novae", "--out", tmp_path / "o",
          "--device", "cpu", fragment="cannot load the VAE")
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(data_lib.DataError, match="no arr_0"):
        images_lib.read_images(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(data_lib.DataError, match=r"expected uint8 \[N, H, W, 3\]"):
        images_lib.read_images(str(tmp_path / "float.npz"))
    images_lib.save_png(str(tmp_path / "one" / "b.png"), np.zeros((9, 8, 3), np.uint8))
    with pytest.raises(data_lib.DataError, match="differ in size"):
        images_lib.read_images(str(tmp_path / "one"))
    # The weights (and torch-fidelity) are checked before any image is read.
    has_fidelity = importlib.util.find_spec("torch_fidelity") is not None
    fails("evaluate", "--samples", tmp_path / "bad.npz", "--ref", tmp_path / "one", "--feature-weights",
          tmp_path / "none.pth", "--device", "cpu", fragment="does not exist" if has_fidelity else "sit_ext[eval]")


# ----------------------------------------------------- checkpoints, sampling


def test_export_is_a_bit_exact_safetensors_round_trip(exported):
    from safetensors import safe_open

    from sit_ext.models import SiT

    ckpt_path, path = exported
    ckpt = training.load_checkpoint(str(ckpt_path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert set(tensors) == set(ckpt["ema"])
    assert all(tensors[k].dtype == v.dtype and torch.equal(tensors[k], v) for k, v in ckpt["ema"].items())
    assert json.loads(meta["config"]) == ckpt["config"] and json.loads(meta["data"]) == ckpt["data"]
    assert meta["weights"] == "ema" and meta["step"] == "2" and meta["ema_warmup"] == "1"
    model = SiT.from_pretrained(path, model="SiT-S/2", input_size=8, in_channels=4, hidden_size=32, depth=1,
                                num_heads=2, num_classes=2, learn_sigma=False)
    assert not model.training
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in model.state_dict().items())


def test_export_follows_the_umask_as_torch_save_does(exported, tmp_path):
    """safetensors creates its file 0600; an export is as readable as the checkpoint it came from."""
    from sit_ext.models import save_safetensors

    previous = os.umask(0o027)
    try:
        assert run_cli("export", "--ckpt", exported[0], "--out", tmp_path / "a.safetensors") == 0
        save_safetensors(tmp_path / "b.safetensors", {"w": torch.zeros(2)}, {})
        torch.save({}, tmp_path / "c.pt")
    finally:
        os.umask(previous)
    modes = [os.stat(tmp_path / name).st_mode & 0o777 for name in ("a.safetensors", "b.safetensors", "c.pt")]
    assert modes == [0o640] * 3, [oct(m) for m in modes]


def test_sample_with_vae_from_safetensors_needs_no_pickle(exported, vae_dir, tmp_path, monkeypatch):
    """Export, VAE and outputs are safetensors, PNG and .npy/.npz: sampling
    works with torch.load (the pickle reader) switched off."""
    from sit_ext.models import SiT

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_pickle)
    _, path = exported
    assert [f for f in os.listdir(path.parent)] == ["sit.safetensors"]
    SiT.from_pretrained(path, model="SiT-S/2", input_size=8, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                        num_classes=2, learn_sigma=False)
    out = tmp_path / "out"
    assert run_cli("sample", "--ckpt", path, "--vae", vae_dir, "--num-samples", 5, "--batch-size", 2,
                   "--cfg-scale", 1.5, "--out", out, *SAMPLE) == 0
    assert sorted(os.listdir(out / "images")) == [f"{i:06d}.png" for i in range(5)] + ["settings.json"]
    with np.load(out / "samples.npz", allow_pickle=False) as f:
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (5, 16, 16, 3)  # ADM's layout
        assert f["labels"].tolist() == [0, 1, 0, 1, 0]
        assert np.array_equal(f["arr_0"][3], images_lib.read_image(str(out / "images" / "000003.png")))
    assert images_lib.read_image(str(out / "samples.png")).shape == (2 + 2 * 18, 2 + 3 * 18, 3)  # 2 rows of 3


def test_sample_with_vae_resumes_and_keeps_written_images(exported, vae_dir, tmp_path, capsys):
    _, path = exported
    out = tmp_path / "out"
    common = ["sample", "--ckpt", path, "--vae", vae_dir, "--batch-size", 3, "--out", out, *SAMPLE]
    assert run_cli(*common, "--num-samples", 4) == 0
    folder = out / "images"
    first = {i: images_lib.read_image(str(folder / f"{i:06d}.png")) for i in range(4)}
    stamps = {i: os.stat(folder / f"{i:06d}.png").st_mtime_ns for i in (0, 1, 3)}
    os.remove(folder / "000002.png")  # as if stopped before it was written
    capsys.readouterr()
    assert run_cli(*common, "--num-samples", 6) == 0
    assert "3 drawn" in capsys.readouterr().out  # 2, 4 and 5
    assert {i: os.stat(folder / f"{i:06d}.png").st_mtime_ns for i in (0, 1, 3)} == stamps
    # Sample 2 starts from its own noise, whatever batch it lands in.
    again = images_lib.read_image(str(folder / "000002.png")).astype(int)
    assert np.abs(again - first[2]).max() <= 1
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (6, 16, 16, 3)
    assert run_cli(*common, "--num-samples", 6, "--seed", 1) == 2
    assert "other settings (seed)" in capsys.readouterr().err
    (folder / "settings.json").write_text('{"seed": 0, "ste')
    assert run_cli(*common, "--num-samples", 6) == 2
    err = capsys.readouterr().err
    assert "settings.json is damaged" in err.splitlines()[-1] and "Traceback" not in err


def test_sample_with_vae_refuses_a_checkpoint_trained_on(exported, vae_dir, tmp_path, capsys):
    """settings.json records the checkpoint's contents: a run trained on under
    the same path would have mixed two models' images; a folder with no image
    yet takes new settings (a run that failed before its first image locked it)."""
    ckpt, path = exported
    other = tmp_path / "nested" / "folders" / "model.safetensors"  # export makes the folders
    assert run_cli("export", "--ckpt", ckpt, "--weights", "model", "--out", other) == 0
    copy = tmp_path / "sit.safetensors"
    copy.write_bytes(path.read_bytes())
    out = tmp_path / "out"
    common = ["sample", "--ckpt", copy, "--vae", vae_dir, "--out", out, *SAMPLE]
    assert run_cli(*common, "--num-samples", 2) == 0
    copy.write_bytes(other.read_bytes())  # the same path, other weights
    capsys.readouterr()
    assert run_cli(*common, "--num-samples", 3, "--weights", "model") == 2
    assert "other settings (the checkpoint's contents, weights)" in capsys.readouterr().err
    for png in (out / "images").glob("*.png"):
        png.unlink()
    assert run_cli(*common, "--num-samples", 3, "--weights", "model") == 0


@pytest.mark.slow
def test_sample_with_vae_under_torchrun_splits_the_work(exported, vae_dir, tmp_path):
    _, path = exported
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    args = ["sample", "--ckpt", path, "--vae", vae_dir, "--num-samples", 5, "--batch-size", 2, *SAMPLE]
    assert run_cli(*args, "--out", single) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "sit_ext", *args, "--out", ddp]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(single / "samples.npz") as a, np.load(ddp / "samples.npz") as b:
        assert np.abs(a["arr_0"].astype(int) - b["arr_0"]).max() <= 1  # the same samples, drawn by two ranks


# ---------------------------------------------------------------- evaluation


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_feature_weights_are_read_without_running_code(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pth"
    torch.save({"w": Evil()}, path)
    with pytest.raises(ValueError, match="refusing"):
        evaluate.read_weights(str(path))
    assert not marker.exists()
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(ValueError, match="plain.pkl"):
        evaluate.read_weights(str(tmp_path / "plain.pkl"))
    assert not marker.exists()


def test_evaluate_warns_about_few_images(tmp_path, capsys, monkeypatch):
    """8 samples against 16 references: one warning line naming FID-50K; none at 2048 a side."""
    rng = np.random.default_rng(0)
    for name, n in (("s8", 8), ("r16", 16), ("s2048", 2048), ("r2048", 2048)):
        np.savez(tmp_path / f"{name}.npz", arr_0=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8))
    monkeypatch.setattr(evaluate, "inception", lambda weights, device: None)  # no torch-fidelity needed
    monkeypatch.setattr(evaluate, "evaluate_images", lambda net, s, r, *a, **k: {
        "fid": 1.0, "inception_score": 1.0, "inception_score_std": 0.0, "precision": 1.0, "recall": 1.0,
        "samples": len(s), "ref": len(r)})
    for samples, ref, warned in (("s8", "r16", True), ("s2048", "r2048", False)):
        assert run_cli("evaluate", "--samples", tmp_path / f"{samples}.npz", "--ref", tmp_path / f"{ref}.npz",
                       "--feature-weights", tmp_path / "unused.pth", "--device", "cpu", "--quiet") == 0
        err = capsys.readouterr().err.strip().splitlines()
        if warned:
            assert len(err) == 1 and err[0].startswith("sit-ext evaluate: warning: FID from 8 samples against 16")
            assert "FID-50K" in err[0]
        else:
            assert err == []


@pytest.fixture
def inception_weights(tmp_path, monkeypatch):
    """torch-fidelity's InceptionV3 with random weights (He-scaled, so that
    features neither vanish nor explode), as .safetensors."""
    pytest.importorskip("torch_fidelity")
    from safetensors.torch import save_file
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with monkeypatch.context() as m:  # build it without its weights: no download, no file
        m.setattr(fe, "load_state_dict_from_url", lambda *args, **kwargs: {})
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        net = fe.FeatureExtractorInceptionV3(evaluate.FEATURE_EXTRACTOR, ["2048"])
    torch.manual_seed(0)
    for p in net.parameters():
        if p.dim() > 1:
            torch.nn.init.kaiming_normal_(p, nonlinearity="relu")
    path = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def test_evaluate_samples_against_images(exported, vae_dir, inception_weights, tmp_path, capsys, monkeypatch):
    """InceptionV3 on the CPU takes about a second per image here: 4 against 4."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    _, path = exported
    out = tmp_path / "samples"
    assert run_cli("sample", "--ckpt", path, "--vae", vae_dir, "--num-samples", 4, "--out", out, *SAMPLE) == 0
    ref = tmp_path / "ref"
    rng = np.random.default_rng(1)
    for i in range(4):  # class subfolders are searched too
        (ref / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        images_lib.save_png(str(ref / f"c{i % 2}" / f"{i}.png"), rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    features = []
    extract = evaluate.inception_features
    monkeypatch.setattr(evaluate, "inception_features", lambda *a, **k: features.append(extract(*a, **k)) or
                        features[-1])
    capsys.readouterr()
    assert run_cli("evaluate", "--samples", out / "samples.npz", "--ref", ref, "--feature-weights",
                   inception_weights, "--device", "cpu", "--quiet") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert lines[0].startswith("FID") and any(line.startswith("Inception Score") for line in lines)
    assert result["samples"] == 4 and result["ref"] == 4
    assert result["fid"] > 0 and result["inception_score"] >= 1.0
    assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    # The FID is torch-fidelity's own formula on the same features, and 0 for a set against itself.
    (feats_s, _), (feats_r, _) = features
    assert feats_s.shape == feats_r.shape == (4, 2048)
    theirs = fid_statistics_to_metric(fid_features_to_statistics(feats_s), fid_features_to_statistics(feats_r),
                                      verbose=False)["frechet_inception_distance"]
    assert result["fid"] == pytest.approx(theirs, rel=1e-5)
    assert abs(evaluate.frechet_distance(feats_r, feats_r)) < 1e-6 * result["fid"]
