"""Decoded training images in one memory-mapped uint8 file, so epochs after the first skip JPEG/PNG.

Each distinct image is decoded once (with the same guards as everywhere: inside the image root,
decompression-bomb check), resized so its shorter side is the model's input size and centre
cropped, exactly as open_clip's eval transform does before its tensor conversion, and stored as
(size, size, 3) uint8. Training crops then come from that square: a little less context than
cropping the original, in exchange for no decoding after the first pass.
Written by hand: neither Lightning nor open_clip caches decoded images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from rich.progress import track

from pipeline.data.files import atomic_write, text_sha256
from pipeline.data.images import load_rgb, resolve_image_path


def square(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (bicubic), then the centre `size` x `size` crop."""
    width, height = image.size
    scale = size / min(width, height)
    if (width, height) != (size, size):
        image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))),
                             Image.Resampling.BICUBIC)
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageCache:
    """path -> PIL image, read from `<folder>/images-<size>.npy` (built on first use)."""

    def __init__(self, folder: Path, paths: list[str], root: Path, size: int):
        self.paths = sorted(set(paths))
        self.index = {p: i for i, p in enumerate(self.paths)}
        self.size = size
        self.file = folder / f"images-{size}.npy"
        self._array: np.ndarray | None = None
        listing = folder / f"images-{size}.json"
        key = text_sha256(self.paths, str(root), size)
        if not (self.file.is_file() and listing.is_file() and json.loads(listing.read_text()).get("key") == key):
            self._build(root)
            with atomic_write(listing) as tmp:
                tmp.write_text(json.dumps({"key": key, "images": len(self.paths), "size": size}))

    def _build(self, root: Path) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.file) as tmp:
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                              shape=(len(self.paths), self.size, self.size, 3))
            for i, path in enumerate(track(self.paths, description="caching decoded images")):
                array[i] = np.asarray(square(load_rgb(resolve_image_path(root, path)), self.size))
            array.flush()
            del array

    def __getstate__(self) -> dict:
        # DataLoader workers map the file themselves instead of receiving a copy of it
        return {**self.__dict__, "_array": None}

    def get(self, path: str) -> Image.Image:
        if self._array is None:
            self._array = np.load(self.file, mmap_mode="r")
        return Image.fromarray(np.array(self._array[self.index[path]]))
