import subprocess
import sys

import numpy as np
import open_clip
import torch

from pipeline.config import TrainConfig
from pipeline.training.model import embed_texts, load_checkpoint, save_checkpoint, starting_model


def test_seeded_start_is_reproducible():
    a, b = starting_model(TrainConfig(seed=3)), starting_model(TrainConfig(seed=3))
    for (name, pa), (_, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


def test_checkpoint_roundtrip_gives_identical_embeddings(tmp_path):
    bundle = starting_model(TrainConfig(seed=1))
    folder = save_checkpoint(bundle, tmp_path / "ckpt")
    assert not list(folder.glob("*.pt")) and not list(folder.glob("*.bin"))  # safetensors only
    loaded = load_checkpoint(folder)
    texts = ["navy trainers", "red striped mug"]
    np.testing.assert_array_equal(embed_texts(bundle, texts), embed_texts(loaded, texts))
    norms = np.linalg.norm(embed_texts(loaded, texts), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def test_checkpoint_loads_with_plain_open_clip_in_a_fresh_process(tmp_path):
    folder = save_checkpoint(starting_model(TrainConfig(seed=1)), tmp_path / "ckpt")
    code = (
        "import open_clip, sys; "
        f"m, _, _ = open_clip.create_model_and_transforms('local-dir:{folder}', weights_only=True); "
        "assert 'pipeline' not in sys.modules; print(type(m).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() in {"CLIP", "CustomTextCLIP"}
    assert open_clip.__name__ == "open_clip"


def test_trimmed_text_encoding_equals_full_context():
    from pipeline.training.model import encode_text, trim_tokens

    for name in ("ClickCLIP-Tiny", "ViT-B-32"):
        torch.manual_seed(0)
        model = open_clip.create_model(name).eval()
        tokens = open_clip.get_tokenizer(name)(["navy trainers", "a", "red striped ceramic mug with a handle"])
        trimmed = trim_tokens(tokens)
        assert trimmed.shape[1] < tokens.shape[1]
        with torch.no_grad():
            full = model.encode_text(tokens, normalize=True)
            short = encode_text(model, tokens)
        torch.testing.assert_close(short, full, atol=1e-6, rtol=1e-5)


def test_uint8_loader_output_normalised_on_device_equals_open_clips_transform():
    """The loader's uint8 half plus DeviceNormalize is bit-identical to open_clip's float transform,
    for the random training crop (same seed) and the evaluation transform."""
    from PIL import Image

    from pipeline.errors import ConfigError
    from pipeline.training.model import split_transform

    bundle = starting_model(TrainConfig(model="ViT-B-32"))
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 260, 3), dtype=np.uint8))
    for transform in (bundle.preprocess_train, bundle.preprocess_eval):
        host, normalise = split_transform(transform)
        torch.manual_seed(7)
        expected = transform(image)
        torch.manual_seed(7)
        pixels = host(image)
        assert pixels.dtype == torch.uint8
        assert torch.equal(normalise(pixels[None])[0], expected)
    float_batch = torch.randn(2, 3, 8, 8)
    assert normalise(float_batch) is float_batch  # already-normalised input passes through
    import pytest

    with pytest.raises(ConfigError, match="ToTensor and Normalize"):
        split_transform(lambda image: image)


def test_embedding_image_files_in_worker_processes_equals_embedding_decoded_images(tiny_shop):
    """embed_image_files (decoding in workers, uint8 normalised on the device) gives the embeddings
    of open_clip's own float transform on the same files, with and without worker processes."""
    import polars as pl

    from pipeline.data.images import load_rgb, resolve_image_path
    from pipeline.training.model import embed_image_files

    catalog = pl.read_parquet(tiny_shop / "images.parquet")
    root = tiny_shop / "images"
    paths = [p for p in catalog["path"] if (root / p).is_file() and (root / p).read_bytes()[:4] == b"\x89PNG"][:40]
    bundle = starting_model(TrainConfig(seed=0))
    with torch.no_grad():
        pixels = torch.stack([bundle.preprocess_eval(load_rgb(resolve_image_path(root, p))) for p in paths])
        expected = bundle.model.eval().encode_image(pixels, normalize=True).numpy()
    for workers in (0, 2):
        got = embed_image_files(bundle, root, paths, batch_size=16, num_workers=workers)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_catalog_embedding_sharded_over_two_processes_equals_one(tiny_shop):
    """evaluate.devices: 2 (here two CPU processes, on a GPU machine one per GPU) embeds the catalog
    in two contiguous shards: the same vectors, in the same order, as one process; the caller's
    model stays where it was."""
    import polars as pl

    from pipeline.training.model import embed_image_files, embed_image_files_on_devices

    root = tiny_shop / "images"
    paths = [p for p in pl.read_parquet(tiny_shop / "images.parquet")["path"]
             if (root / p).is_file() and (root / p).read_bytes()[:4] == b"\x89PNG"][:41]  # an odd count
    bundle = starting_model(TrainConfig(seed=4))
    one = embed_image_files(bundle, root, paths, batch_size=8, num_workers=0)
    two = embed_image_files_on_devices(bundle, root, paths, batch_size=8, num_workers=0, devices=2)
    assert two.shape == one.shape == (41, bundle.model_cfg["embed_dim"])
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-5)
    assert next(bundle.model.parameters()).device.type == "cpu"
