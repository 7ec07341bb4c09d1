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
