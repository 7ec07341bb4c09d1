"""A model's catalog vectors on disk, so publish reuses what evaluate embedded.

Evaluate writes the candidate's image and title vectors with the image ids, content digests and
titles they were computed from and the digest of the weights that computed them; publish takes a
row only when all four still match and embeds the rest. Plain arrays in an .npz (no pickles).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class CatalogVectors:
    weights: str  # digest of the weights that embedded them
    image_ids: list[str]
    digests: list[str]
    titles: list[str]  # "" where none
    images: np.ndarray  # (n, d) image vectors
    title_vectors: np.ndarray  # (n, d) title vectors, zeros where no title

    def save(self, path: Path) -> None:
        with path.open("wb") as handle:
            np.savez(handle, weights=np.array(self.weights), image_ids=np.array(self.image_ids, dtype=str),
                     digests=np.array(self.digests, dtype=str), titles=np.array(self.titles, dtype=str),
                     images=self.images.astype(np.float32), title_vectors=self.title_vectors.astype(np.float32))

    @classmethod
    def empty(cls) -> CatalogVectors:
        """Nothing to reuse."""
        return cls("", [], [], [], np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32))

    @classmethod
    def load(cls, path: Path) -> CatalogVectors:
        with np.load(path, allow_pickle=False) as data:
            return cls(str(data["weights"]), data["image_ids"].tolist(), data["digests"].tolist(),
                       data["titles"].tolist(), data["images"], data["title_vectors"])

    def reusable(self, weights: str, image_ids: list[str], digests: list[str], titles: list[str], dim: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each wanted image: (reused mask, image vectors, title vectors), (n, dim) with zeros where
        not reused. A row is reused only if the weights, the image id, its content digest and its
        title match."""
        mask = np.zeros(len(image_ids), bool)
        images = np.zeros((len(image_ids), dim), np.float32)
        title_vectors = np.zeros_like(images)
        if weights != self.weights or self.images.shape[1:] != (dim,):
            return mask, images, title_vectors
        row_of = {(i, d, t): row for row, (i, d, t) in enumerate(zip(self.image_ids, self.digests, self.titles,
                                                                       strict=True))}
        for j, key in enumerate(zip(image_ids, digests, titles, strict=True)):
            row = row_of.get(key)
            if row is not None:
                mask[j] = True
                images[j], title_vectors[j] = self.images[row], self.title_vectors[row]
        return mask, images, title_vectors
