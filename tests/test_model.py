import subprocess
import sys

import numpy as np
import open_clip
import torch

from pipeline.config import TrainConfig
from pipeline.model import embed_texts, load_checkpoint, save_checkpoint, starting_model


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
    from pipeline.model import encode_text, trim_tokens

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
