"""Groups of catalog images that must share a split (near-duplicates, identical files, one
product) and the sticky, hash-based assignment of groups to train/val/test."""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.config import SplitConfig, SplitFractions
from pipeline.data.near_duplicates import near_duplicate_pairs

EXCLUDED = "excluded"


SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


def catalog_groups(hashes: list[str], digests: list[str], product_ids: list[str | None], max_distance: int,
                   giant_size: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group label per image, near-duplicate hash edges, cut edges): images within `max_distance`
    bits, with identical content, or of one product are merged transitively.

    Look-alike photos (flags, signs, plain shapes) can chain many products into one giant group that
    would land whole in one split. A group above `giant_size` images that spans several products is
    therefore regrouped without its near-duplicate links between different products (identical files
    and same-product links still bind); those cut links are returned, for split to keep them out of
    evaluation (exclude_crossing_links)."""
    hash_edges = near_duplicate_pairs(hashes, max_distance)
    hard = np.concatenate([same_key_pairs(digests), same_key_pairs(product_ids)])
    labels = connected_groups(len(hashes), np.concatenate([hash_edges, hard]))
    if giant_size is None or not len(hash_edges):
        return labels, hash_edges, np.zeros((0, 2), dtype=np.int64)
    sizes = np.bincount(labels)
    products = np.array([p if p is not None else f"\0{i}" for i, p in enumerate(product_ids)], dtype=object)
    giant = sizes[labels[hash_edges[:, 0]]] > giant_size
    cross = products[hash_edges[:, 0]] != products[hash_edges[:, 1]]
    cut = giant & cross
    if not cut.any():
        return labels, hash_edges, np.zeros((0, 2), dtype=np.int64)
    return connected_groups(len(hashes), np.concatenate([hash_edges[~cut], hard])), hash_edges, hash_edges[cut]


def exclude_crossing_links(splits: list[str], cut_edges: np.ndarray) -> int:
    """For each cut near-duplicate link whose images landed in different splits, exclude the image
    on the later side (train < val < test) from training and evaluation, in place; return how many."""
    excluded = 0
    for i, j in cut_edges.tolist():
        a, b = splits[i], splits[j]
        if EXCLUDED in (a, b) or a == b:
            continue
        later = i if SPLIT_ORDER[a] > SPLIT_ORDER[b] else j
        splits[later] = EXCLUDED
        excluded += 1
    return excluded


def same_key_pairs(keys: list[str | None]) -> np.ndarray:
    """Edges chaining every item to the first item with the same (non-null) key, shape (P, 2)."""
    first: dict[str, int] = {}
    edges = []
    for i, key in enumerate(keys):
        if key is None:
            continue
        if key in first:
            edges.append((first[key], i))
        else:
            first[key] = i
    return np.array(edges, dtype=np.int64).reshape(-1, 2)


def connected_groups(n: int, edges: np.ndarray) -> np.ndarray:
    """Component label per node; scipy's union of all edges."""
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def stable_fraction(key: str, salt: str) -> float:
    """A number in [0, 1) fixed by the salted sha256 of `key`."""
    return int.from_bytes(hashlib.sha256(f"{salt}:{key}".encode()).digest()[:8], "big") / 2**64


def stable_split(group_key: str, salt: str, fractions: SplitFractions) -> str:
    """train/val/test from a salted hash of the group key: the same group always lands alike."""
    u = stable_fraction(group_key, salt)
    if u < fractions.train:
        return "train"
    return "val" if u < fractions.train + fractions.val else "test"


def assign_sticky_splits(image_ids: list[str], labels: np.ndarray, registry: dict[str, str],
                         cfg: SplitConfig, registered_at: dict[str, str] | None = None) -> tuple[list[str], dict]:
    """Split per image. Registered images keep their split; new images follow their group's.

    A group whose registered images sit in different splits (new images linked them, products were
    merged, a photo was replaced) follows `cfg.link_policy`. keep_and_exclude: the registry keeps
    every assignment, the split registered first (by `registered_at`, then train < val < test) keeps
    its images, and the images registered into the other splits, and the new images, are excluded
    from training and evaluation. exclude_group: the whole group is excluded."""
    members: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        members[int(label)].append(i)
    splits = [""] * len(image_ids)
    stats = {"new_groups": 0, "grown_groups": 0, "linked_groups": 0, "images_excluded": 0}
    for group in members.values():
        registered = {registry[image_ids[i]] for i in group if image_ids[i] in registry}
        if not registered:
            key = min(image_ids[i] for i in group)
            for i in group:
                splits[i] = stable_split(key, cfg.salt, cfg.fractions)
            stats["new_groups"] += 1
        elif len(registered) == 1:
            (split,) = registered
            stats["grown_groups"] += any(image_ids[i] not in registry for i in group)
            for i in group:
                splits[i] = split
        else:
            stats["linked_groups"] += 1
            stamps = registered_at or {}
            owner = min(registered, key=lambda split: (min(stamps.get(image_ids[i], "") for i in group
                                                           if registry.get(image_ids[i]) == split),
                                                       SPLIT_ORDER.get(split, 3)))
            for i in group:
                keep = cfg.link_policy == "keep_and_exclude" and registry.get(image_ids[i]) == owner
                splits[i] = owner if keep else EXCLUDED
                stats["images_excluded"] += not keep
    return splits, stats


def look_alikes(image_ids: list[str], product_ids: list[str | None], group_ids: list) -> dict[str, set[str]]:
    """Per image, the images sharing its near-duplicate group or its product, itself included:
    what neither a hard negative (train) nor a miss (evaluate's filtered ranking) may be."""
    members: dict[str, set[str]] = defaultdict(set)
    for image, product, group in zip(image_ids, product_ids, group_ids, strict=True):
        members[f"group:{group}"].add(image)
        if product is not None:
            members[f"product:{product}"].add(image)
    return {image: members[f"group:{group}"] | (members[f"product:{product}"] if product is not None else set())
            for image, product, group in zip(image_ids, product_ids, group_ids, strict=True)}
