"""Sentences the Markdown and HTML reports share, each built from evaluate's summary."""

from __future__ import annotations


def search_sentence(info: dict) -> str:
    if info.get("index") == "hnsw":
        return (f"approximate (FAISS HNSW) over L2-normalised embeddings, large gallery; its recall of the exact "
                f"top k on a sample of queries: {info['ann_recall_vs_exact']:.4f}.")
    return f"exact inner product (FAISS IndexFlatIP, {info.get('device', 'cpu')}) over L2-normalised embeddings."


def reindex_sentence(summary: dict) -> str:
    reindex = summary["reindex"]
    seconds = reindex["estimated_seconds"]
    duration = f"{seconds:.0f} seconds" if seconds < 120 else f"{seconds / 60:.1f} minutes" if seconds < 7200 \
        else f"{seconds / 3600:.1f} hours"
    return (f"**Re-index notice.** Promoting the candidate changes the embedding space: serving must re-embed "
            f"all {reindex['images']} catalog images with it before it answers queries. At the "
            f"{reindex['images_per_s']:.0f} images/s measured during this evaluation (this machine, decoding "
            f"included) that takes about {duration}; scale by the serving fleet's throughput.")
