"""Clicked (query, image) pairs as a PyTorch dataset, and the loaders that feed training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from pipeline.config import TrainConfig
from pipeline.data.images import load_rgb, resolve_image_path
from pipeline.training.image_cache import ImageCache
from pipeline.training.model import ClipBundle, split_transform
from pipeline.training.samplers import EpochShuffleSampler, UniqueBatchSampler


class PairDataset(Dataset):
    """(uint8 image tensor, query text, image_id, product_id or "", pair weight) for each clicked pair.

    Images leave the dataset as uint8 CHW; ClipFineTuner normalises them on the device."""

    def __init__(self, pairs: pl.DataFrame, root: Path, bundle: ClipBundle, train: bool, seed: int = 0,
                 cache: ImageCache | None = None):
        self.queries = pairs["query"].to_list()
        self.image_ids = pairs["image_id"].to_list()
        self.product_ids = [p or "" for p in pairs["product_id"].to_list()]
        self.paths = pairs["path"].to_list()
        self.weights = pairs["weight"].cast(pl.Float32).to_list()
        self.root = root
        self.cache = cache
        self.train = train
        self.seed = seed
        self.transform = split_transform(bundle.preprocess_train if train else bundle.preprocess_eval)[0]

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, str, str, str, float]:
        """`key` is an index, or (index, epoch) from the training samplers."""
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        path = self.paths[index]
        image = self.cache.get(path) if self.cache else load_rgb(resolve_image_path(self.root, path))
        if self.train:
            # the random crop depends on (seed, epoch, index) only: resumable and worker-independent
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]))
                tensor = self.transform(image)
        else:
            tensor = self.transform(image)
        return (tensor, self.queries[index], self.image_ids[index], self.product_ids[index],
                self.weights[index])


class TokenizingCollate:
    """Collate PairDataset items into [images, texts, image_ids, product_ids, weights, tokens].

    The queries are tokenised here, in the loader's worker processes: open_clip's tokenizer takes
    about 40 ms of Python per 1,024 queries, time the training process would leave the GPU idle."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list) -> list:
        images, texts, image_ids, product_ids, weights = default_collate(items)
        return [images, list(texts), list(image_ids), list(product_ids), weights, self.tokenizer(list(texts))]


def title_pairs(images_path: Path, split: str = "train") -> pl.DataFrame:
    """The catalog's own (title, image) pairs of one split, shaped like training_pairs: the warm
    start's data (train.warm_start: titles)."""
    images = pl.read_parquet(images_path)
    if "title" not in images.columns:
        return pl.DataFrame(schema={"query": pl.Utf8, "image_id": pl.Utf8, "product_id": pl.Utf8, "weight": pl.Float64,
                                    "path": pl.Utf8})
    return images.filter((pl.col("split") == split) & pl.col("title").str.strip_chars().str.len_chars().gt(0)).select(
        pl.col("title").alias("query"), "image_id", "product_id", pl.lit(1.0).alias("weight"), "path").sort(
        "query", "image_id")


def training_pairs(pairs_path: Path, images_path: Path, split: str, min_clicks: int) -> pl.DataFrame:
    images = pl.read_parquet(images_path).select("image_id", "path")
    # held-out queries are never trained on: evaluation measures them as unseen queries
    pairs = pl.read_parquet(pairs_path).filter((pl.col("split") == split) & (pl.col("clicks") >= min_clicks)
                                               & (pl.col("clicks") > 0) & ~pl.col("query_heldout"))
    return pairs.join(images, on="image_id").sort("query", "image_id")


def loss_weights(pairs: pl.DataFrame, mode: str) -> pl.DataFrame:
    """The pairs with `weight` as train.pair_weights asks: extract's click weight as it is, or
    (relevance) that weight per impression, the pair's click rate (position-debiased under
    extract.weighting ips)."""
    if mode != "relevance":
        return pairs
    return pairs.with_columns((pl.col("weight") / pl.col("impressions").clip(lower_bound=1)).alias("weight"))


def make_loader(dataset: PairDataset, pairs: pl.DataFrame, cfg: TrainConfig, train: bool, tokenizer,
                buddies: dict[int, list[int]] | None = None) -> DataLoader:
    """The loader; with `buddies` (mined hard negatives), unique batches that pack each pair next
    to one holding a hard negative of its query."""
    workers = {"num_workers": cfg.num_workers, "persistent_workers": cfg.num_workers > 0,
               "pin_memory": torch.cuda.is_available(), "collate_fn": TokenizingCollate(tokenizer)}
    if train and (cfg.unique_batches or buddies is not None):
        sampler = UniqueBatchSampler(pairs["query"].to_list(), pairs["image_id"].to_list(),
                                     pairs["product_id"].to_list(), cfg.batch_size, cfg.seed, buddies)
        return DataLoader(dataset, batch_sampler=sampler, **workers)
    if train:
        return DataLoader(dataset, batch_size=cfg.batch_size, sampler=EpochShuffleSampler(len(dataset), cfg.seed),
                          drop_last=True, **workers)
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, **workers)
