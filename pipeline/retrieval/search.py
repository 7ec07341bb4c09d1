"""Nearest-neighbour search: exact for every metric that decides promotion, approximate (HNSW)
for exploration and serving, with its recall against exact search measured on the same embeddings.

Embeddings are L2-normalised first, so inner product is cosine similarity. Exact search is a
torch matmul + top-k on a visible GPU (the FAISS GPU build is not always installable), else
FAISS IndexFlatIP on CPU, both in chunks of queries so memory stays bounded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import faiss
import numpy as np

HNSW_NEIGHBOURS = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
ANN_CHECK_QUERIES = 1000  # queries re-searched exactly to measure the approximate index's recall


@dataclass(frozen=True)
class SearchInfo:
    index: str  # "flat" or "hnsw"
    device: str  # "cpu" or "gpu"
    seconds: float  # searching only
    build_seconds: float  # building the index (0 for flat)
    ann_recall_vs_exact: float | None  # share of the exact top k that the approximate index returned

    def as_dict(self) -> dict:
        return {"index": self.index, "device": self.device, "seconds": round(self.seconds, 3),
                "build_seconds": round(self.build_seconds, 3), "ann_recall_vs_exact": self.ann_recall_vs_exact}


def normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def flat_index(gallery: np.ndarray, use_gpu: bool):
    index = faiss.IndexFlatIP(gallery.shape[1])
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(gallery)
    return index


def search(queries: np.ndarray, gallery: np.ndarray, k: int, ann_min_gallery: int,
           use_gpu: bool | None = None) -> tuple[np.ndarray, SearchInfo]:
    """Top-k indices per query, exact below `ann_min_gallery` gallery items and HNSW above it."""
    use_gpu = gpu_available() if use_gpu is None else use_gpu
    queries, gallery = normalise(queries), normalise(gallery)
    k = min(k, gallery.shape[0])
    started = time.perf_counter()
    if len(gallery) < ann_min_gallery:
        index = flat_index(gallery, use_gpu)
        built = time.perf_counter()
        _, neighbours = index.search(queries, k)
        return neighbours, SearchInfo("flat", "gpu" if use_gpu else "cpu", time.perf_counter() - built,
                                      built - started, None)
    index = faiss.IndexHNSWFlat(gallery.shape[1], HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(gallery)
    index.hnsw.efSearch = max(HNSW_EF_SEARCH, k)
    built = time.perf_counter()
    _, neighbours = index.search(queries, k)
    seconds = time.perf_counter() - built
    sample = np.random.default_rng(0).choice(len(queries), min(ANN_CHECK_QUERIES, len(queries)), replace=False)
    _, exact = flat_index(gallery, use_gpu).search(queries[sample], k)
    found = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(neighbours[sample], exact, strict=True))
    return neighbours, SearchInfo("hnsw", "cpu", seconds, built - started, round(found / exact.size, 4))


EXACT_CHUNK = 4096  # queries per exact-search chunk: 4,096 x 1M float32 scores is 16 GB, so the GPU path
GPU_SCORE_ELEMENTS = 1 << 28  # caps scores per chunk at 2^28 (1 GiB of float32) instead


def exact_search(queries: np.ndarray, gallery: np.ndarray, k: int,
                 device: str | None = None) -> tuple[np.ndarray, SearchInfo]:
    """Exact top-k gallery indices per query by cosine similarity, shape (Q, min(k, G)).

    `device`: "cuda" or "cpu"; default a visible GPU, else the CPU."""
    _, top, info = exact_search_scored(queries, gallery, k, device)
    return top, info


def exact_search_scored(queries: np.ndarray, gallery: np.ndarray, k: int,
                        device: str | None = None) -> tuple[np.ndarray, np.ndarray, SearchInfo]:
    """As exact_search, with the cosine similarities of the returned indices first."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    queries, gallery = normalise(queries), normalise(gallery)
    k = min(k, gallery.shape[0])
    started = time.perf_counter()
    scores, tops = [], []
    if device == "cuda":
        items = torch.from_numpy(gallery).to("cuda")
        chunk = max(1, min(EXACT_CHUNK, GPU_SCORE_ELEMENTS // max(1, len(gallery))))
        for start in range(0, len(queries), chunk):
            best = (torch.from_numpy(queries[start:start + chunk]).to("cuda") @ items.T).topk(k, dim=1)
            scores.append(best.values.cpu().numpy())
            tops.append(best.indices.cpu().numpy())
    else:
        index = flat_index(gallery, use_gpu=False)
        for start in range(0, len(queries), EXACT_CHUNK):
            values, indices = index.search(queries[start:start + EXACT_CHUNK], k)
            scores.append(values)
            tops.append(indices)
    top = np.concatenate(tops) if tops else np.zeros((0, k), np.int64)
    score = np.concatenate(scores) if scores else np.zeros((0, k), np.float32)
    return score, top, SearchInfo("exact", device, time.perf_counter() - started, 0.0, None)


def approximate_recall(queries: np.ndarray, gallery: np.ndarray, k: int, exact_top: np.ndarray) -> SearchInfo:
    """Build HNSW over the gallery and measure the share of the exact top k it returns, on up to
    ANN_CHECK_QUERIES queries: what serving from an approximate index would lose."""
    queries, gallery = normalise(queries), normalise(gallery)
    k = min(k, gallery.shape[0])
    sample = np.random.default_rng(0).choice(len(queries), min(ANN_CHECK_QUERIES, len(queries)), replace=False)
    started = time.perf_counter()
    index = faiss.IndexHNSWFlat(gallery.shape[1], HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(gallery)
    index.hnsw.efSearch = max(HNSW_EF_SEARCH, k)
    built = time.perf_counter()
    _, approximate = index.search(queries[sample], k)
    exact = exact_top[sample, :k]
    found = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(approximate, exact, strict=True))
    return SearchInfo("hnsw", "cpu", time.perf_counter() - built, built - started, round(found / max(1, exact.size), 4))


def product_vectors(images: np.ndarray, titles: np.ndarray, has_title: np.ndarray, title_weight: float) -> np.ndarray:
    """Catalog vectors as served: normalise((1 − β) image + β title) for images with a title, the
    image embedding alone for the rest (β = title_weight; 0 = images only). Embeddings come in
    L2-normalised (as embed_image_files and embed_texts return them)."""
    if title_weight == 0:
        return images
    mixed = (1 - title_weight) * images + title_weight * titles
    mixed[~has_title] = images[~has_title]
    return normalise(mixed)
