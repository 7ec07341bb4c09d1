"""What a model is: open_clip models, their transforms and tokenizer, and safetensors checkpoints.

A checkpoint is a folder in open_clip's own `local-dir:` layout (`open_clip_config.json` with
`model_cfg` and `preprocess_cfg`, plus `open_clip_model.safetensors`), so it loads with plain
`open_clip.create_model_and_transforms("local-dir:<folder>")`, without this package.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import save_model
from torchvision.transforms import Compose, Normalize, PILToTensor

from pipeline.config import TrainConfig
from pipeline.data.files import file_sha256
from pipeline.data.images import load_rgb, resolve_image_path
from pipeline.errors import ConfigError

open_clip.add_model_config(Path(__file__).parent / "model_configs")

CONFIG_FILE = "open_clip_config.json"
SIGLIP_LOGIT_BIAS = -10.0  # SigLIP's initial bias (Zhai et al. 2023)
WEIGHTS_FILE = "open_clip_model.safetensors"


@dataclass
class ClipBundle:
    model: torch.nn.Module
    preprocess_train: Callable[[Image.Image], torch.Tensor]
    preprocess_eval: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    model_cfg: dict
    source: str  # where the weights came from, for reports


def load_checkpoint(folder: Path) -> ClipBundle:
    """Load a checkpoint folder written by `save_checkpoint` (or any open_clip local-dir)."""
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ConfigError(f"checkpoint {folder} needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    name = f"local-dir:{folder}"
    model, train_tf, eval_tf = open_clip.create_model_and_transforms(name, weights_only=True)
    model_cfg = json.loads((folder / CONFIG_FILE).read_text())["model_cfg"]
    return ClipBundle(model, train_tf, eval_tf, open_clip.get_tokenizer(name), model_cfg, str(folder))


def starting_model(cfg: TrainConfig) -> ClipBundle:
    """The model training starts from: a local checkpoint, a local pretrained file, or a seeded init."""
    if cfg.checkpoint is not None:
        return load_checkpoint(cfg.checkpoint)
    if cfg.model not in open_clip.list_models():
        raise ConfigError(f"train.model {cfg.model!r} is not an open_clip model config")
    if cfg.pretrained is not None and not Path(cfg.pretrained).is_file():
        raise ConfigError(f"train.pretrained {cfg.pretrained!r} is not a local file: clickclip never "
                          "downloads weights at run time; download them once and point to the file")
    torch.manual_seed(cfg.seed)  # the same random init in train and evaluate
    model_cfg = dict(open_clip.get_model_config(cfg.model))
    extra = {}
    if cfg.loss == "siglip" and "init_logit_bias" not in model_cfg:
        extra = {"init_logit_bias": SIGLIP_LOGIT_BIAS}
        model_cfg.update(extra)  # saved with the checkpoint, so it reloads with its bias
    model, train_tf, eval_tf = open_clip.create_model_and_transforms(cfg.model, weights_only=True, **extra)
    if cfg.pretrained is not None:
        open_clip.load_checkpoint(model, cfg.pretrained, weights_only=True)
        if extra:  # CLIP weights carry no logit bias (open_clip fills in 0): start SigLIP's at its init
            with torch.no_grad():
                model.logit_bias.fill_(SIGLIP_LOGIT_BIAS)
    source = cfg.pretrained or f"random init (seed {cfg.seed})"
    return ClipBundle(model, train_tf, eval_tf, open_clip.get_tokenizer(cfg.model), model_cfg, source)


BATCHNORM = (torch.nn.modules.batchnorm._BatchNorm,)


def batchnorm_layers(model: torch.nn.Module) -> list[str]:
    """The names of `model`'s BatchNorm layers (a ResNet tower has them; ViTs use LayerNorm)."""
    return [name for name, module in model.named_modules() if isinstance(module, BATCHNORM)]


def freeze_batchnorm(model: torch.nn.Module) -> None:
    """Every BatchNorm layer in eval mode: it normalises with its running statistics and leaves
    them as they are, so it is a fixed per-channel affine map of its input (its scale and shift
    still learn). Call after every `model.train()`."""
    for module in model.modules():
        if isinstance(module, BATCHNORM):
            module.eval()


def text_encoder_limits(cfg: TrainConfig) -> tuple[Callable[[str], int], int, str]:
    """(token counter, context length, model name) of the model training starts from: how many
    tokens a query takes in that model's tokenizer (with start and end tokens), and how many fit."""
    if cfg.checkpoint is not None:
        config_file = cfg.checkpoint / CONFIG_FILE
        if not config_file.is_file():
            raise ConfigError(f"train.checkpoint {cfg.checkpoint} has no {CONFIG_FILE}")
        name, model_cfg = f"local-dir:{cfg.checkpoint}", json.loads(config_file.read_text())["model_cfg"]
    else:
        if cfg.model not in open_clip.list_models():
            raise ConfigError(f"train.model {cfg.model!r} is not an open_clip model config")
        name, model_cfg = cfg.model, open_clip.get_model_config(cfg.model)
    context = int(model_cfg.get("text_cfg", {}).get("context_length", 77))
    tokenizer = open_clip.get_tokenizer(name)
    if hasattr(tokenizer, "encode"):  # open_clip's BPE: ids without the start and end tokens
        return (lambda text: len(tokenizer.encode(text)) + 2), context, name
    return (lambda text: len(tokenizer.tokenizer(text)["input_ids"])), context, name  # a Hugging Face tokenizer


def save_checkpoint(bundle: ClipBundle, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": bundle.model_cfg,
              "preprocess_cfg": open_clip.get_model_preprocess_cfg(bundle.model)}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_model(bundle.model, str(folder / WEIGHTS_FILE))
    return folder


def weights_digest(folder: Path) -> str:
    """sha256 of a checkpoint folder's weights: which model computed a set of vectors."""
    return file_sha256(folder / WEIGHTS_FILE)


def trim_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Drop the padding columns every row shares: click-log queries use a few of the 77 positions."""
    used = (tokens != 0).any(dim=0).nonzero()
    return tokens[:, : int(used.max()) + 1] if len(used) else tokens[:, :1]


def encode_text(model: torch.nn.Module, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """open_clip's CLIP.encode_text on tokens trimmed to the batch's longest query.

    Exact: the text tower's attention is causal, so padding after a query's end token never
    reaches the pooled end-token feature. open_clip's CLIP adds the full positional table and so
    needs all 77 positions; this is that method with the table and mask cut to the used length.
    Pass tokens in host memory: they are trimmed there and moved to the model's device (trimming
    device tokens would wait for the device to finish all queued work).
    Models without a causal, end-token-pooled text tower are encoded untrimmed."""
    device = next(model.parameters()).device
    trimmable = isinstance(model, open_clip.CLIP) and model.attn_mask is not None \
        and model.text_pool_type == "argmax"
    if not trimmable:
        return model.encode_text(tokens.to(device, non_blocking=True), normalize=normalize)
    return encode_text_prefix(model, trim_tokens(tokens).to(device, non_blocking=True), normalize)


def encode_text_prefix(model: torch.nn.Module, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """encode_text for tokens already cut to any length up to the context (what ONNX exports:
    the caller trims, the graph takes the length it is given)."""
    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) \
            else x @ model.text_projection
    return torch.nn.functional.normalize(x, dim=-1) if normalize else x


class DeviceNormalize(torch.nn.Module):
    """The float conversion and Normalize of open_clip's transform, applied to a uint8 batch on the device.

    Data loaders then move uint8 pixels (a quarter of float32's bytes through host memory, pinning and
    the bus) and skip the per-sample float arithmetic; the result is bit-identical to ToTensor +
    Normalize on the host (same operations, same order, in float32)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:  # already normalised on the host
            return images
        return images.to(torch.float32).div_(255).sub_(self.mean).div_(self.std)


def split_transform(transform: Callable) -> tuple[Callable[[Image.Image], torch.Tensor], DeviceNormalize]:
    """Split open_clip's `Compose([..., ToTensor, Normalize])` into a host part giving uint8 CHW
    tensors and the DeviceNormalize that finishes it on the device."""
    steps = list(getattr(transform, "transforms", []))
    if (len(steps) < 2 or not isinstance(steps[-1], Normalize)
            or type(steps[-2]).__name__ not in {"ToTensor", "MaybeToTensor"}):
        raise ConfigError(f"cannot split the image transform {transform!r}: expected it to end in "
                          "ToTensor and Normalize, as open_clip's transforms do")
    return Compose([*steps[:-2], PILToTensor()]), DeviceNormalize(steps[-1].mean, steps[-1].std)


def to_best_device(bundle: ClipBundle) -> str:
    """Move the model to the GPU when one is visible (embedding a catalog on a GPU box's CPU would
    waste it); return the device's name."""
    if torch.cuda.is_available():
        bundle.model.to("cuda")
        return torch.cuda.get_device_name()
    return "cpu"


class _ImageFiles(torch.utils.data.Dataset):
    """Decoded, preprocessed (uint8) images of catalog files, for a DataLoader's workers."""

    def __init__(self, root: Path, paths: list[str], transform: Callable):
        self.root, self.paths, self.transform = root, paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(load_rgb(resolve_image_path(self.root, self.paths[index])))


def default_decode_workers() -> int:
    """Processes that decode images for embedding: on a GPU machine decoding is the bottleneck (one
    process fed an H100 ~420 ViT-B-32 images/s), on a CPU-only one the model needs the cores."""
    return min(8, max(1, len(os.sched_getaffinity(0)) - 1)) if torch.cuda.is_available() else 0  # cores we may use


@torch.no_grad()
def embed_image_files(bundle: ClipBundle, root: Path, paths: list[str], batch_size: int = 256,
                      num_workers: int | None = None, progress: Callable | None = None,
                      encode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
    """L2-normalised embeddings of image files under `root`, float32, shape (len(paths), embed_dim).

    Files are decoded and resized in `num_workers` processes (default: default_decode_workers())
    and normalised on the model's device; the embeddings equal those of open_clip's own float
    transform on the same images.
    `progress` wraps the batch iterator (e.g. rich's track). `encode` replaces the model's image
    tower on the normalised pixels (e.g. the exported tower on onnxruntime, OnnxImageEncoder)."""
    bundle.model.eval()
    device = next(bundle.model.parameters()).device
    encode = encode or (lambda pixels: bundle.model.encode_image(pixels, normalize=True))
    host, normalise = split_transform(bundle.preprocess_eval)
    normalise = normalise.to(device)
    workers = default_decode_workers() if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(_ImageFiles(root, paths, host), batch_size=batch_size,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    batches = progress(loader) if progress else loader
    chunks = [encode(normalise(batch.to(device, non_blocking=True))).float().cpu() for batch in batches]
    dim = bundle.model_cfg["embed_dim"]
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, dim), np.float32)


def _embed_shard(rank: int, bundle: ClipBundle, root: Path, shards: list[list[str]], batch_size: int,
                 num_workers: int | None, out: str) -> None:
    """One process of embed_image_files_on_devices: GPU `rank` when there are GPUs, else its share
    of the CPU's threads; writes its shard's embeddings to `out/<rank>.npy`."""
    if torch.cuda.is_available():
        torch.cuda.set_device(rank)
        bundle.model.to(f"cuda:{rank}")
    else:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // len(shards)))
    np.save(f"{out}/{rank}.npy", embed_image_files(bundle, root, shards[rank], batch_size, num_workers))


def embed_image_files_on_devices(bundle: ClipBundle, root: Path, paths: list[str], batch_size: int = 256,
                                 num_workers: int | None = None, devices: int = 1,
                                 progress: Callable | None = None) -> np.ndarray:
    """embed_image_files with the catalog cut into `devices` contiguous shards, one process each
    (GPU i on a GPU machine, else the CPU's cores shared out): the same embeddings, in order, as
    one process (tests/test_model.py runs 2 CPU processes). Catalog embedding needs no collective,
    so no process group: each process embeds its shard and the parent concatenates them.
    `progress` applies to one process only (the shards report nothing while they run)."""
    devices = min(devices, len(paths))
    if devices <= 1:
        return embed_image_files(bundle, root, paths, batch_size, num_workers, progress)
    import tempfile

    import torch.multiprocessing as mp

    shards = [paths[s.start:s.stop] for s in _contiguous(len(paths), devices)]
    device = next(bundle.model.parameters()).device
    bundle.model.cpu()  # the shards move their copy to their own device
    try:
        with tempfile.TemporaryDirectory(prefix="clickclip-embed-") as out:
            mp.start_processes(_embed_shard, args=(bundle, root, shards, batch_size, num_workers, out),
                               nprocs=devices, join=True, start_method="spawn")
            return np.concatenate([np.load(f"{out}/{rank}.npy") for rank in range(devices)])
    finally:
        bundle.model.to(device)


def _contiguous(n: int, parts: int) -> list[slice]:
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.no_grad()
def embed_texts(bundle: ClipBundle, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """L2-normalised text embeddings, float32, shape (len(texts), embed_dim)."""
    bundle.model.eval()
    chunks = [encode_text(bundle.model, bundle.tokenizer(batch)).float().cpu()
              for batch in _batches(texts, batch_size)]
    dim = bundle.model_cfg["embed_dim"]
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, dim), np.float32)


def titled(titles: list[str]) -> np.ndarray:
    """Whether each catalog title is there (not blank)."""
    return np.array([bool(t.strip()) for t in titles], dtype=bool)


def embed_titles(bundle: ClipBundle, titles: list[str], batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(text embeddings of catalog titles, zeros where a title is blank; whether each has one)."""
    has_title = titled(titles)
    vectors = np.zeros((len(titles), bundle.model_cfg["embed_dim"]), np.float32)
    if has_title.any():
        vectors[has_title] = embed_texts(bundle, [t for t, keep in zip(titles, has_title, strict=True) if keep],
                                         batch_size)
    return vectors, has_title


