"""Safe image access shared by split, train and evaluate.

Paths from the catalog are untrusted: they must resolve (symlinks followed) inside the image
root. Pillow's decompression-bomb guard stays on; odd modes (palette, CMYK, 16-bit, alpha)
are converted to RGB rather than rejected.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class UnusableImage(Exception):
    """An image that cannot be used; `reason` is the quarantine reason code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def resolve_image_path(root: Path, relative: str) -> Path:
    """Absolute path of a catalog image, refusing anything that escapes the image root, holds a NUL
    byte or runs into a symbolic-link loop."""
    if "\x00" in relative:
        raise UnusableImage("bad_path", repr(relative))
    root = root.resolve()
    try:
        candidate = (root / relative).resolve()
    except (RuntimeError, OSError) as exc:  # RuntimeError: a symbolic-link loop
        raise UnusableImage("bad_path", f"{relative}: {exc}") from None
    if not candidate.is_relative_to(root):
        raise UnusableImage("path_escapes_root", relative)
    return candidate


def still_there(root: Path, relative: str) -> bool:
    """Whether a catalog path split kept still names a file: evaluate and publish leave out the
    images gone since (deleted, moved), count them and warn, rather than failing on them."""
    try:
        return resolve_image_path(root, relative).is_file()
    except (UnusableImage, OSError):
        return False


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = max(float(array.max()), 1.0)
        image = Image.fromarray((array * (255.0 / top)).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, rgba)
    return image.convert("RGB")


def load_rgb(path: Path, data: bytes | None = None, draft: int | None = None, grey: bool = False) -> Image.Image:
    """Decode an image (first frame) as RGB, or raise UnusableImage with a reason code.

    `data`: the file's bytes, already read (`path` then only names it). `draft`: a JPEG may be
    decoded at a reduced scale (1/2, 1/4 or 1/8, Pillow's draft mode) as long as both sides stay
    at least `draft` pixels: much faster for large photos when only a small version is needed.
    `grey`: such a JPEG is decoded as luma only and returned greyscale (for perceptual hashes,
    which work on greyscale anyway)."""
    if data is None:
        try:
            if not path.is_file():
                raise UnusableImage("missing_file", str(path))
            if path.stat().st_size == 0:
                raise UnusableImage("empty_file", str(path))
        except OSError as exc:  # a symbolic-link loop, a permission problem
            raise UnusableImage("unreadable", f"{path}: {exc}") from None
    elif not data:
        raise UnusableImage("empty_file", str(path))
    try:
        with warnings.catch_warnings():
            # over MAX_IMAGE_PIXELS is a bomb for us, not just a warning
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path if data is None else io.BytesIO(data)) as image:
                if draft is not None and image.format == "JPEG":
                    image.draft("L" if grey and image.mode in ("L", "RGB", "YCbCr") else image.mode, (draft, draft))
                image.load()
                return image if grey and image.mode == "L" and draft is not None else to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnusableImage("oversized", str(exc)) from None
    except UnidentifiedImageError:
        raise UnusableImage("not_an_image", str(path)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnusableImage("unreadable", f"{path}: {exc}") from None
