"""Procedural product photos for the demo catalog: silhouette x colour x pattern x background.

Each product gets its own geometry jitter so that different products do not hash alike,
while photos of one product share a silhouette and differ in background and framing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64

# unit-square outlines; y grows downwards
SILHOUETTES: dict[str, list[tuple[float, float]]] = {
    "tshirt": [(.3, .15), (.42, .2), (.58, .2), (.7, .15), (.92, .35), (.8, .45), (.72, .38),
               (.72, .88), (.28, .88), (.28, .38), (.2, .45), (.08, .35)],
    "jacket": [(.3, .12), (.45, .16), (.55, .16), (.7, .12), (.9, .3), (.95, .85), (.82, .86),
               (.75, .4), (.75, .9), (.25, .9), (.25, .4), (.18, .86), (.05, .85), (.1, .3)],
    "dress": [(.4, .1), (.6, .1), (.62, .35), (.85, .92), (.15, .92), (.38, .35)],
    "sneaker": [(.08, .55), (.35, .5), (.5, .35), (.62, .35), (.7, .5), (.92, .6), (.94, .75),
                (.06, .75)],
    "hat": [(.1, .7), (.25, .62), (.3, .35), (.45, .25), (.6, .28), (.7, .4), (.72, .62),
            (.9, .7), (.5, .76)],
    "bag": [(.2, .4), (.8, .4), (.86, .9), (.14, .9)],
    "mug": [(.25, .25), (.65, .25), (.65, .85), (.25, .85)],
    "lamp": [(.35, .12), (.65, .12), (.78, .45), (.22, .45)],
}

COLOURS: dict[str, tuple[int, int, int]] = {
    "dark blue": (20, 35, 110), "red": (200, 30, 35), "green": (40, 150, 60),
    "black": (25, 25, 25), "white": (245, 245, 240), "yellow": (240, 210, 40),
    "pink": (240, 130, 180), "grey": (128, 128, 128), "orange": (245, 130, 30),
    "brown": (120, 75, 35),
}

PATTERNS = ("plain", "striped", "dotted", "checked")

BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (255, 255, 255), (230, 230, 230), (235, 225, 205), (215, 230, 245), (60, 60, 70),
)


@dataclass(frozen=True)
class ProductLook:
    """Everything that fixes how one product looks, drawn once per product."""

    category: str
    colour: str
    pattern: str
    scale: float
    stretch: float
    dx: float
    dy: float
    pattern_period: int
    pattern_phase: int
    tint: tuple[int, int, int]
    badge: tuple[float, float, float, int]  # x, y, radius, grey level of a product's printed logo


def draw_look(rng: np.random.Generator, category: str, colour: str, pattern: str) -> ProductLook:
    return ProductLook(
        category=category, colour=colour, pattern=pattern,
        scale=float(rng.uniform(0.75, 1.0)), stretch=float(rng.uniform(0.8, 1.2)),
        dx=float(rng.uniform(-0.1, 0.1)), dy=float(rng.uniform(-0.08, 0.08)),
        pattern_period=int(rng.integers(5, 11)), pattern_phase=int(rng.integers(0, 5)),
        tint=tuple(int(v) for v in rng.integers(-25, 26, size=3)),
        badge=(float(rng.uniform(0.35, 0.65)), float(rng.uniform(0.45, 0.7)),
               float(rng.uniform(0.06, 0.14)), int(rng.integers(0, 256))),
    )


def _outline(look: ProductLook, shift: tuple[float, float], zoom: float) -> list[tuple[float, float]]:
    points = []
    for x, y in SILHOUETTES[look.category]:
        cx = (x - 0.5) * look.scale * zoom * look.stretch + 0.5 + look.dx + shift[0]
        cy = (y - 0.5) * look.scale * zoom / look.stretch + 0.5 + look.dy + shift[1]
        points.append((cx * SIZE, cy * SIZE))
    return points


def _pattern_layer(look: ProductLook) -> Image.Image:
    base = np.array(COLOURS[look.colour], dtype=np.int16) + np.array(look.tint, dtype=np.int16)
    accent = np.where(base > 128, base - 90, base + 90)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    period, phase = look.pattern_period, look.pattern_phase
    if look.pattern == "striped":
        on = ((yy + phase) // (period // 2 + 1)) % 2 == 0
    elif look.pattern == "dotted":
        on = ((xx + phase) % period - period / 2) ** 2 + ((yy + phase) % period - period / 2) ** 2 < 3
    elif look.pattern == "checked":
        on = (((xx + phase) // period) + ((yy + phase) // period)) % 2 == 0
    else:
        on = np.zeros((SIZE, SIZE), dtype=bool)
    pixels = np.where(on[..., None], accent, base)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _backdrop(rng: np.random.Generator) -> Image.Image:
    """A studio backdrop: base colour, a lighting gradient at a random angle and a soft prop."""
    base = np.array(BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))], dtype=np.float32)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    light = (np.cos(angle) * xx + np.sin(angle) * yy) * rng.uniform(40, 110)
    pixels = base + light[..., None]
    for _ in range(2):
        centre, r = rng.uniform(-0.5, 0.5, 2), rng.uniform(0.1, 0.3)
        blob = np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * r * r))
        pixels = pixels + blob[..., None] * rng.uniform(-90, 90, 3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def render_photo(look: ProductLook, rng: np.random.Generator, lifestyle: bool = False) -> Image.Image:
    """One photo of a product: its own backdrop and a slightly different framing. A lifestyle
    photo shows the product smaller, off-centre, among other objects."""
    spread = 0.15 if lifestyle else 0.05
    shift = (float(rng.uniform(-spread, spread)), float(rng.uniform(-spread, spread)))
    zoom = float(rng.uniform(0.6, 0.75)) if lifestyle else float(rng.uniform(0.9, 1.1))
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).polygon(_outline(look, shift, zoom), fill=255)
    photo = _backdrop(rng)
    if lifestyle:  # a room around the product: furniture-sized blocks in other colours
        draw = ImageDraw.Draw(photo)
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = rng.uniform(0, 0.8, 2) * SIZE
            w, h = rng.uniform(0.15, 0.4, 2) * SIZE
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    product = _pattern_layer(look)
    bx, by, br, grey = look.badge
    ImageDraw.Draw(product).ellipse([(bx - br) * SIZE, (by - br) * SIZE, (bx + br) * SIZE, (by + br) * SIZE],
                                    fill=(grey, grey, grey))
    photo.paste(product, (0, 0), mask)
    noise = rng.normal(0, 4, size=(SIZE, SIZE, 3))
    return Image.fromarray(np.clip(np.asarray(photo, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def near_duplicate(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A re-uploaded copy: slightly resized back and forth and brightened (saved as JPEG by the caller)."""
    side = int(rng.integers(SIZE - 4, SIZE + 5))
    copy = photo.resize((side, side), Image.BICUBIC).resize((SIZE, SIZE), Image.BICUBIC)
    gain = float(rng.uniform(1.02, 1.08))
    return Image.fromarray(np.clip(np.asarray(copy, dtype=np.float32) * gain, 0, 255).astype(np.uint8))
