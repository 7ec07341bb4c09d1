"""ONNX exports of the two towers, for serving stacks that run onnxruntime instead of PyTorch.

`text.onnx` takes `tokens` (int64, batch x length, any length up to the model's context: trim the
tokenizer's output to the longest query, as clickclip's own encoder does) and returns L2-normalised
`text_features`; `image.onnx` takes `pixels` (float32, batch x 3 x S x S, open_clip's eval
transform) and returns `image_features`. `onnx.json` beside them says so, with the preprocessing.
Each export is checked against PyTorch on the spot; the largest absolute difference is recorded
and an export beyond PARITY_TOLERANCE is refused.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import StageError
from pipeline.training.model import encode_text_prefix, load_checkpoint, trim_tokens

PARITY_TOLERANCE = 1e-4
PARITY_QUERIES = ["navy striped trainers", "mug", "red linen summer dress with buttons", "oak desk lamp"]


class _Text(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return encode_text_prefix(self.model, tokens)


class _Image(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels, normalize=True)


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path, name: str, output: str,
            dims: dict[int, torch.export.Dim]) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), (example,), input_names=[name], output_names=[output],
                                    dynamic_shapes={name: dims}, dynamo=True, verbose=False)
        program.save(str(path))


def export_onnx(checkpoint: Path, out_dir: Path) -> dict:
    """Export both towers of a checkpoint folder, check parity, write `onnx.json`; return its content."""
    import onnxruntime as ort

    bundle = load_checkpoint(checkpoint)
    model = bundle.model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    context = model.positional_embedding.shape[0]
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    tokens = trim_tokens(bundle.tokenizer(PARITY_QUERIES))
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    _export(_Text(model), tokens, out_dir / "text.onnx", "tokens", "text_features",
            {0: torch.export.Dim("batch"), 1: torch.export.Dim("length", max=context)})
    _export(_Image(model), pixels, out_dir / "image.onnx", "pixels", "image_features",
            {0: torch.export.Dim("batch")})

    # parity on other shapes than the export's examples: one query at a time, a batch of five images
    text_session = ort.InferenceSession(str(out_dir / "text.onnx"), providers=["CPUExecutionProvider"])
    image_session = ort.InferenceSession(str(out_dir / "image.onnx"), providers=["CPUExecutionProvider"])
    text_diff = 0.0
    with torch.no_grad():
        for query in PARITY_QUERIES:
            one = trim_tokens(bundle.tokenizer([query]))
            got = text_session.run(None, {"tokens": one.numpy()})[0]
            text_diff = max(text_diff, float(np.abs(got - encode_text_prefix(model, one).numpy()).max()))
        five = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(1))
        got = image_session.run(None, {"pixels": five.numpy()})[0]
        image_diff = float(np.abs(got - model.encode_image(five, normalize=True).numpy()).max())
    if max(text_diff, image_diff) > PARITY_TOLERANCE:
        raise StageError(f"ONNX export of {checkpoint} differs from PyTorch by {max(text_diff, image_diff):.2e} "
                         f"(> {PARITY_TOLERANCE}); not logging it")
    from open_clip import get_model_preprocess_cfg

    description = {
        "text": {"file": "text.onnx", "input": "tokens (int64, batch x length <= context), open_clip tokenizer "
                 "output trimmed to the longest query", "output": "text_features (float32, L2-normalised)",
                 "context_length": context},
        "image": {"file": "image.onnx", "input": "pixels (float32, batch x 3 x S x S) after the preprocessing below",
                  "output": "image_features (float32, L2-normalised)"},
        "preprocess": {k: list(v) if isinstance(v, tuple) else v
                       for k, v in get_model_preprocess_cfg(model).items()},
        "parity_max_abs_diff": {"text": text_diff, "image": image_diff},
    }
    (out_dir / "onnx.json").write_text(json.dumps(description, indent=2))
    return description


def cpu_session(model_file: Path, threads: int):
    """An onnxruntime session on the CPU provider with `threads` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])


class OnnxTextEncoder:
    """A registered version's exported text tower on onnxruntime, with the checkpoint's open_clip
    tokenizer and each batch's context trimmed to its longest query: the query path of serving."""

    def __init__(self, onnx_dir: Path, checkpoint: Path, threads: int = 2):
        import open_clip

        self.session = cpu_session(onnx_dir / "text.onnx", threads)
        self.tokenizer = open_clip.get_tokenizer(f"local-dir:{checkpoint}")

    def __call__(self, texts: list[str]) -> np.ndarray:
        tokens = trim_tokens(self.tokenizer(texts))
        return self.session.run(None, {"tokens": tokens.numpy()})[0]


class OnnxImageEncoder:
    """An exported image tower on onnxruntime's CPU provider, for `embed_image_files(encode=...)`:
    normalised pixels in (open_clip's eval transform), L2-normalised features out."""

    def __init__(self, onnx_dir: Path, threads: int = 2):
        self.session = cpu_session(onnx_dir / "image.onnx", threads)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.session.run(None, {"pixels": pixels.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(features)
