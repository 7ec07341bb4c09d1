"""MLflow pyfunc model for serving, logged as code (no pickles); self-contained on purpose.

It depends on open_clip, torch, Pillow and pandas only, never on the clickclip package, so a
serving image needs no training code. Input: a DataFrame whose rows each carry either a `text`
(str) or an `image` (encoded image bytes). Output: L2-normalised float32 embeddings, one row each.
"""

import io

import numpy as np
import open_clip
import pandas as pd
import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel
from PIL import Image


class ClipEmbedder(PythonModel):
    def load_context(self, context):
        folder = f"local-dir:{context.artifacts['checkpoint']}"
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(folder, weights_only=True)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(folder)

    @torch.no_grad()
    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        texts = model_input["text"] if "text" in model_input else pd.Series([None] * len(model_input))
        images = model_input["image"] if "image" in model_input else pd.Series([None] * len(model_input))
        rows = []
        for text, image in zip(texts, images, strict=True):
            has_text, has_image = isinstance(text, str), isinstance(image, (bytes, bytearray))
            if has_text == has_image:
                raise ValueError("each row needs exactly one of 'text' (str) or 'image' (bytes)")
            if has_text:
                rows.append(self.model.encode_text(self.tokenizer([text]), normalize=True)[0])
            else:
                with Image.open(io.BytesIO(image)) as decoded:
                    pixels = self.preprocess(decoded.convert("RGB")).unsqueeze(0)
                rows.append(self.model.encode_image(pixels, normalize=True)[0])
        return torch.stack(rows).float().numpy()


set_model(ClipEmbedder())
