"""Nearest-neighbour search for evaluation: exact by default, approximate for large galleries.

Embeddings are L2-normalised before indexing, so inner product is cosine similarity. Exact search
is FAISS IndexFlatIP, on a GPU when FAISS was built with GPU support and one is visible, else on
CPU. Galleries larger than `evaluate.ann_min_gallery` use HNSW (IndexHNSWFlat), and the recall of
its top k against exact search is measured on a sample of queries and reported, so nobody has to
trust an approximate number blindly.
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
