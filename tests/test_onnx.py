import json

import numpy as np
import onnxruntime as ort
import torch

from pipeline.config import TrainConfig
from pipeline.training.model import embed_texts, save_checkpoint, starting_model, trim_tokens
from pipeline.training.onnx_export import PARITY_TOLERANCE, export_onnx


def test_onnx_towers_match_pytorch(tmp_path):
    bundle = starting_model(TrainConfig(seed=2))
    checkpoint = save_checkpoint(bundle, tmp_path / "ckpt")
    description = export_onnx(checkpoint, tmp_path / "onnx")
    parity = description["parity_max_abs_diff"]
    print(f"ONNX parity max abs diff: text {parity['text']:.2e}, image {parity['image']:.2e}")
    assert max(parity.values()) < 1e-5 < PARITY_TOLERANCE
    assert json.loads((tmp_path / "onnx" / "onnx.json").read_text())["text"]["context_length"] == 16

    # a query through onnxruntime, trimmed as documented, equals clickclip's own embedding
    session = ort.InferenceSession(str(tmp_path / "onnx" / "text.onnx"), providers=["CPUExecutionProvider"])
    tokens = trim_tokens(bundle.tokenizer(["navy striped trainers", "mug"]))
    got = session.run(None, {"tokens": tokens.numpy()})[0]
    np.testing.assert_allclose(got, embed_texts(bundle, ["navy striped trainers", "mug"]), atol=1e-5)
    images = ort.InferenceSession(str(tmp_path / "onnx" / "image.onnx"), providers=["CPUExecutionProvider"])
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = bundle.model.eval().encode_image(pixels, normalize=True).numpy()
    np.testing.assert_allclose(images.run(None, {"pixels": pixels.numpy()})[0], expected, atol=1e-5)


def test_catalog_files_embed_the_same_through_the_onnx_image_tower(tmp_path, tiny_shop):
    """embed_image_files with the exported tower on onnxruntime (the CPU re-embed path bench_eval
    times) gives the PyTorch tower's embeddings of the same files."""
    import polars as pl

    from pipeline.training.model import embed_image_files
    from pipeline.training.onnx_export import OnnxImageEncoder

    bundle = starting_model(TrainConfig(seed=3))
    export_onnx(save_checkpoint(bundle, tmp_path / "ckpt"), tmp_path / "onnx")
    root = tiny_shop / "images"
    paths = [p for p in pl.read_parquet(tiny_shop / "images.parquet")["path"]
             if (root / p).is_file() and (root / p).read_bytes()[:4] == b"\x89PNG"][:24]
    expected = embed_image_files(bundle, root, paths, batch_size=8, num_workers=0)
    onnx = OnnxImageEncoder(tmp_path / "onnx")
    got = embed_image_files(bundle, root, paths, batch_size=8, num_workers=0, encode=onnx)
    assert got.shape == expected.shape == (len(paths), bundle.model_cfg["embed_dim"])
    np.testing.assert_allclose(got, expected, atol=1e-5)
