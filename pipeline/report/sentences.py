"""Sentences the Markdown and HTML reports share, each built from evaluate's summary."""

from __future__ import annotations


def search_sentence(info: dict) -> str:
    engine = "torch matmul + top-k on the GPU" if info.get("device") == "cuda" else "FAISS IndexFlatIP on the CPU"
    sentence = (f"exact inner product ({engine}) over L2-normalised embeddings: every metric here, and so every "
                "gate, comes from exact search.")
    if "hnsw" in info:
        sentence += (f" An HNSW index over the same embeddings (what approximate serving would use) returned "
                     f"{info['hnsw']['ann_recall_vs_exact']:.4f} of the exact top k on a sample of queries.")
    return sentence


def reindex_sentence(summary: dict) -> str:
    reindex = summary["reindex"]
    seconds = reindex["estimated_seconds"]
    duration = f"{seconds:.0f} seconds" if seconds < 120 else f"{seconds / 60:.1f} minutes" if seconds < 7200 \
        else f"{seconds / 3600:.1f} hours"
    return (f"**Re-index notice.** Promoting the candidate changes the embedding space: serving must re-embed "
            f"all {reindex['images']} catalog images with it before it answers queries. At the "
            f"{reindex['images_per_s']:.0f} images/s measured during this evaluation (this machine, decoding "
            f"included) that takes about {duration}; scale by the serving fleet's throughput.")


def relevance_sentences(summary: dict) -> list[str]:
    """What counts as a right answer, as evaluate defined it for this report."""
    unit = ("a clicked test image's product: any photo of the product counts, once, at its best rank"
            if summary.get("relevance") == "product" else "a test-split image the query clicked")
    lines = [f"Relevant result: {unit}; its gain is the click weight of the held-out pair (position-debiased)."]
    if summary.get("filtered"):
        lines.append(f"Filtered ranking: a query's other right answers (its clicks on training or validation images, "
                     f"and other photos of a relevant image's product or near-duplicate group) are removed from its "
                     f"ranked list before scoring, so they count neither as hits nor as misses "
                     f"({summary.get('filtered_per_query', 0):.1f} images per query on average).")
    else:
        lines.append("Unfiltered ranking: a query's clicks outside the test split and other photos of a relevant "
                     "product count as misses when they rank above its test clicks.")
    return lines


def leak_audit_sentence(audit: dict | None) -> str:
    """The leak audit's own verdict and counts, read from leak_audit.json (never assumed)."""
    if audit is None:
        return "Leak audit: no result recorded for this run."
    verdict = "passed" if audit["passed"] else "FAILED"
    return (f"Leak audit: {verdict} — an independent recheck (FAISS range search) of {audit['images_checked']} images "
            f"({audit['images_excluded']} excluded) at Hamming distance ≤ {audit['max_distance']} found "
            f"{audit['near_duplicate_links_crossing']} near-duplicate links, {audit['identical_files_crossing']} "
            f"identical files and {audit['products_crossing']} products crossing train/val/test.")
