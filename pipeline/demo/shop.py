"""A demo shop, generated in exactly the input data contract's format.

Writes `<out>/images/*.png|jpg`, `<out>/images.parquet` (the catalog), `<out>/events/date=*/`
(the click log, hive-partitioned Parquet) and `<out>/truth/` (what was planted: duplicates,
true examination propensities, the relevance of every (query, image) shown, each query's kind:
descriptive or a model number).

Each retrieval method has something to win: titles use merchants' words, not shoppers' ("Drk Blu
Jkt" for "navy rain shell"); some products have an untitled lifestyle photo; some sessions type a
model number that only titles carry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
from rich.progress import track

from pipeline.demo.images import COLOURS, PATTERNS, SILHOUETTES, draw_look, near_duplicate, render_photo

# merchants write titles their own way; shoppers search with other words
TITLE_CATEGORY = {
    "tshirt": ["T-Shirt", "Tee", "TShirt crew neck"], "jacket": ["Jacket", "Jkt", "Outerwear"],
    "dress": ["Dress", "Midi Dress", "Drs"], "sneaker": ["Sneaker", "Athletic Shoe", "Snkr"],
    "hat": ["Hat", "Cap", "Bucket Hat"], "bag": ["Tote Bag", "Handbag", "Bag"],
    "mug": ["Mug", "Coffee Cup", "Ceramic Mug"], "lamp": ["Table Lamp", "Lamp", "Lighting"],
}
QUERY_CATEGORY = {
    "tshirt": ["t shirt", "tee", "top"], "jacket": ["rain shell", "coat", "jacket"],
    "dress": ["dress", "frock", "sundress"], "sneaker": ["trainers", "running shoes", "sneakers"],
    "hat": ["hat", "beanie cap", "sun hat"], "bag": ["tote", "purse", "bag"],
    "mug": ["mug", "cup", "coffee mug"], "lamp": ["lamp", "desk light", "bedside lamp"],
}
TITLE_COLOUR = {
    "dark blue": ["Dark Blue", "Drk Blu", "DK BLUE"], "red": ["Red", "RD", "Crimson"],
    "green": ["Green", "GRN", "Forest"], "black": ["Black", "BLK", "Jet"],
    "white": ["White", "WHT", "Ivory"], "yellow": ["Yellow", "YLW", "Mustard"],
    "pink": ["Pink", "PNK", "Blush"], "grey": ["Grey", "Gry", "Heather"],
    "orange": ["Orange", "ORG", "Rust"], "brown": ["Brown", "BRN", "Tan"],
}
QUERY_COLOUR = {
    "dark blue": ["navy", "dark blue"], "red": ["red"], "green": ["green", "olive"],
    "black": ["black"], "white": ["white", "cream"], "yellow": ["yellow"], "pink": ["pink", "rose"],
    "grey": ["gray", "grey"], "orange": ["orange"], "brown": ["brown", "camel"],
}
TITLE_PATTERN = {"plain": ["", "Solid"], "striped": ["Strp", "Striped"], "dotted": ["Dot", "Polka"],
                 "checked": ["Chk", "Check"]}
QUERY_PATTERN = {"plain": ["plain"], "striped": ["striped", "stripes"], "dotted": ["polka dot"],
                 "checked": ["plaid", "checked"]}
BRANDS = ["ACME", "Nordvik", "Lumo", "Hanako", "Basics&Co", "Verde", "Tallis", "Ozu"]
BRAND_CODES = {"ACME": "AC", "Nordvik": "NV", "Lumo": "LM", "Hanako": "HN", "Basics&Co": "BC", "Verde": "VD",
               "Tallis": "TL", "Ozu": "OZ"}
IDENTIFIER_SHARE = 0.08  # sessions searching a model number: keyword search's home ground
LIFESTYLE_SHARE = 0.2  # products with an extra untitled lifestyle photo (the product in a room)
PATTERN_NAMES = list(PATTERNS)
CATEGORIES = list(SILHOUETTES)
COLOUR_NAMES = list(COLOURS)
RESULTS_PER_QUERY = 10
START = datetime(2026, 11, 9)
DAYS = 7


@dataclass(frozen=True)
class DemoSummary:
    out: Path
    products: int
    images: int
    impressions: int
    planted_duplicates: int


def true_propensities(positions: int = RESULTS_PER_QUERY) -> list[float]:
    """The generator's examination probability of each position (1-based), as a list."""
    return [round(1.0 / (1 + 0.35 * (p - 1)), 6) for p in range(1, positions + 1)]


def model_number(brand: str, index: int) -> str:
    """A product's model number as merchants print it in titles, e.g. NV-1042."""
    return f"{BRAND_CODES[brand]}-{1000 + index}"


def _title(rng: np.random.Generator, category: str, colour: str, pattern: str, brand: str,
           number: str) -> str | None:
    if rng.random() < 0.03:
        return None
    parts = [brand, str(rng.choice(TITLE_CATEGORY[category]))]
    if rng.random() < 0.85:
        parts.append(number)
    if rng.random() < 0.75:  # merchants often leave attributes out
        parts.append(str(rng.choice(TITLE_COLOUR[colour])))
    if rng.random() < 0.6:
        parts.append(str(rng.choice(TITLE_PATTERN[pattern])))
    order = rng.permutation(len(parts) - 1) + 1
    words = [parts[0]] + [parts[i] for i in order]
    return " ".join(w for w in words if w)


def draw_catalog(rng: np.random.Generator, n_products: int, root: Path, lifestyle_share: float = LIFESTYLE_SHARE,
                 first: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Draw products (numbered from `first`) and their photos into `root`; plant near-duplicate
    re-uploads under new product ids."""
    root.mkdir(parents=True, exist_ok=True)
    rows, dups = [], []
    for index in track(range(first, first + n_products), description="drawing catalog"):
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
        pattern = PATTERN_NAMES[int(rng.integers(len(PATTERN_NAMES)))]
        look = draw_look(rng, category, colour, pattern)
        product_id = f"P{index:06d}"
        brand = str(rng.choice(BRANDS))
        number = model_number(brand, index)
        title = _title(rng, category, colour, pattern, brand, number)
        photos = int(rng.integers(1, 4))
        lifestyle = rng.random() < lifestyle_share
        for photo_index in range(photos + lifestyle):
            image_id = f"I{index:06d}{photo_index}"
            in_room = photo_index == photos  # the last photo of a product with a lifestyle shot
            photo = render_photo(look, rng, lifestyle=in_room)
            photo.save(root / f"{image_id}.png")
            # lifestyle photos come from a content team's feed, without the merchant's title
            rows.append((image_id, f"{image_id}.png", product_id, None if in_room else title, category, colour,
                         pattern, number))
            if not in_room and rng.random() < 0.05:
                dup_id, dup_product = f"D{index:06d}{photo_index}", f"R{index:06d}"
                near_duplicate(photo, rng).save(root / f"{dup_id}.jpg", quality=int(rng.integers(80, 96)))
                dup_title = _title(rng, category, colour, pattern, brand, number)
                rows.append((dup_id, f"{dup_id}.jpg", dup_product, dup_title, category, colour, pattern, number))
                dups.append((dup_id, image_id))
    columns = ["image_id", "path", "product_id", "title", "category", "colour", "pattern", "model_number"]
    catalog = pl.DataFrame(rows, schema=columns, orient="row")
    duplicates = pl.DataFrame(dups, schema=["image_id", "duplicate_of"], orient="row")
    return catalog, duplicates


def _intents(rng: np.random.Generator) -> list[tuple[str, str | None, str | None]]:
    """Every (category, colour?, pattern?) a shopper may mean, in popularity order (Zipf head first)."""
    intents = [(c, col, pat) for c in CATEGORIES for col in [None, *COLOUR_NAMES]
               for pat in [None, *PATTERN_NAMES]]
    return [intents[i] for i in rng.permutation(len(intents))]


def _surface_form(rng: np.random.Generator, intent: tuple[str, str | None, str | None]) -> str:
    category, colour, pattern = intent
    words = []
    if colour:
        words.append(str(rng.choice(QUERY_COLOUR[colour])))
    if pattern:
        words.append(str(rng.choice(QUERY_PATTERN[pattern])))
    words.append(str(rng.choice(QUERY_CATEGORY[category])))
    text = " ".join(words)
    roll = rng.random()
    if roll < 0.1:
        text = text.title()
    elif roll < 0.15:
        text = "  " + text.replace(" ", "  ") + " "
    return text


def relevance(intent: tuple[str, str | None, str | None], attrs: tuple[str, str, str]) -> float:
    """Graded truth: 1 when every attribute the shopper asked for matches, 0.2 for the right category."""
    category, colour, pattern = intent
    if attrs[0] != category:
        return 0.0
    if (colour is None or attrs[1] == colour) and (pattern is None or attrs[2] == pattern):
        return 1.0
    return 0.2


def _identifier_query(rng: np.random.Generator, number: str, brand_of: dict[str, str]) -> str:
    """How shoppers type a model number: as printed, the digits after the brand, or the digits."""
    code, digits = number.split("-")
    return str(rng.choice([number.lower(), f"{brand_of[code].lower()} {digits}", digits]))


def _click_log(rng: np.random.Generator, catalog: pl.DataFrame, n_sessions: int,
               identifier_share: float = IDENTIFIER_SHARE, start: datetime = START, session_prefix: str = "S",
               seasonal: tuple[str, ...] = ()) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Sessions under a position-based model: click = examined(position) and attracted(relevance).

    Most sessions describe what they want (category, colour, pattern); IDENTIFIER_SHARE of them
    type a product's model number; with `seasonal` words, a sixth of the descriptive ones add one
    ("red mug gift"). Sessions fall in the DAYS days from `start`. Returns the events and, per
    query, its kind and target."""
    propensity = np.array(true_propensities())
    ids = catalog["image_id"].to_numpy()
    attrs = list(zip(catalog["category"], catalog["colour"], catalog["pattern"], strict=True))
    categories = catalog["category"].to_numpy()
    numbers = catalog["model_number"].to_numpy()
    products = np.unique(numbers)
    product_order = rng.permutation(len(products))
    product_zipf = 1.0 / np.arange(1, len(products) + 1) ** 1.05
    product_zipf /= product_zipf.sum()
    brand_of = {code: brand for brand, code in BRAND_CODES.items()}
    by_category = {c: np.flatnonzero(categories == c) for c in CATEGORIES}
    intents = _intents(rng)
    zipf = 1.0 / np.arange(1, len(intents) + 1) ** 1.1
    zipf /= zipf.sum()
    pools: dict[object, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    rows, kinds = [], {}
    for session in range(n_sessions):
        if rng.random() < identifier_share:
            number = str(products[product_order[int(rng.choice(len(products), p=product_zipf))]])
            key, query = ("number", number), _identifier_query(rng, number, brand_of)
            kinds.setdefault(query, ("identifier", number))
            if key not in pools:
                own = np.flatnonzero(numbers == number)
                pool = np.unique(np.concatenate([own, rng.choice(by_category[categories[own[0]]], 30)]))
                rel = (numbers[pool] == number).astype(float)
                pools[key] = (pool, rel, rel + rng.normal(0, 0.8, len(pool)))
        else:
            which = int(rng.choice(len(intents), p=zipf))
            intent = intents[which]
            key, query = which, _surface_form(rng, intent)
            if seasonal and rng.random() < 1 / 6:
                query = f"{query} {rng.choice(seasonal)}"
            kinds.setdefault(query, ("descriptive", "/".join(str(part) for part in intent)))
            if key not in pools:
                # the production ranker's candidates and its (noisy) idea of their relevance, per intent
                pool = np.unique(np.concatenate([rng.choice(by_category[intent[0]], 40),
                                                 rng.integers(0, len(ids), 20)]))
                rel = np.array([relevance(intent, attrs[i]) for i in pool])
                pools[key] = (pool, rel, rel + rng.normal(0, 0.6, len(pool)))
        pool, rel, score = pools[key]
        # per-session jitter moves the same image across positions, which makes position bias estimable
        order = np.argsort(-(score + rng.normal(0, 0.4, len(pool))))[:RESULTS_PER_QUERY]
        begins = start + timedelta(seconds=int(rng.integers(0, DAYS * 86400)))
        session_id = f"{session_prefix}{session:07d}"
        for position, pick in enumerate(order, start=1):
            attract = 0.02 + 0.78 * rel[pick] ** 2  # partial matches are rarely clicked
            clicked = bool(rng.random() < propensity[position - 1] * attract)
            dwell = int(rng.lognormal(8.5 + 1.5 * rel[pick], 0.5)) if clicked else None
            ts = begins + timedelta(milliseconds=int(position * 150 + rng.integers(0, 100)))
            rows.append((ts, session_id, query, str(ids[pool[pick]]), position, clicked, dwell, float(rel[pick])))
    events = pl.DataFrame(
        rows, orient="row",
        schema={"event_ts": pl.Datetime("us"), "session_id": pl.Utf8, "query": pl.Utf8,
                "image_id": pl.Utf8, "position": pl.Int32, "clicked": pl.Boolean,
                "dwell_ms": pl.Int32, "relevance": pl.Float64},
    )
    queries = pl.DataFrame([(q, kind, target) for q, (kind, target) in sorted(kinds.items())], orient="row",
                           schema=["query", "kind", "target"])
    return events, queries


def _bad_rows(rng: np.random.Generator, events: pl.DataFrame, start: datetime = START,
              bot_id: str = "S_BOT_0001") -> pl.DataFrame:
    """A few rows of each kind extract must quarantine."""
    sample = events.sample(n=6, seed=int(rng.integers(2**31)))
    null_query = sample[0:1].with_columns(pl.lit(None, pl.Utf8).alias("query"))
    empty_query = sample[1:2].with_columns(pl.lit("   ").alias("query"))
    unknown = sample[2:3].with_columns(pl.lit("I_DOES_NOT_EXIST").alias("image_id"))
    bad_position = sample[3:4].with_columns(pl.lit(0, pl.Int32).alias("position"))
    null_position = sample[4:5].with_columns(pl.lit(None, pl.Int32).alias("position"))
    duplicate = sample[5:6]
    too_long = sample[0:1].with_columns(pl.lit(" ".join(["very"] * 90) + " long trainers").alias("query"))
    return pl.concat([null_query, empty_query, unknown, bad_position, null_position, duplicate, too_long,
                      _bot_session(rng, events, start=start + timedelta(days=2, hours=3), session_id=bot_id)])


def _bot_session(rng: np.random.Generator, events: pl.DataFrame, impressions: int = 200,
                 start: datetime = START + timedelta(days=2, hours=3), session_id: str = "S_BOT_0001") -> pl.DataFrame:
    """A scraper: hundreds of impressions within a minute, clicking nearly everything."""
    ids = events["image_id"].unique().sort().to_list()
    return pl.DataFrame({
        "event_ts": [start + timedelta(milliseconds=250 * i) for i in range(impressions)],
        "session_id": [session_id] * impressions,
        "query": [str(rng.choice(["cheap", "sale", "shoes"])) for _ in range(impressions)],
        "image_id": [ids[int(i)] for i in rng.integers(0, len(ids), impressions)],
        "position": [(i % RESULTS_PER_QUERY) + 1 for i in range(impressions)],
        "clicked": [bool(rng.random() < 0.95) for _ in range(impressions)],
        "dwell_ms": [None] * impressions, "relevance": [0.0] * impressions,
    }, schema=events.schema)


def generate(out: Path, products: int = 600, sessions: int = 20000, seed: int = 0,
             identifier_share: float = IDENTIFIER_SHARE, lifestyle_share: float = LIFESTYLE_SHARE) -> DemoSummary:
    """Write the demo shop to `out`; the same seed and sizes give the same bytes in the tables.
    `identifier_share` of sessions search a model number; `lifestyle_share` of products get an
    untitled lifestyle photo."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    catalog, duplicates = draw_catalog(rng, products, out / "images", lifestyle_share)
    events, queries = _click_log(rng, catalog, sessions, identifier_share)
    events = pl.concat([events, _bad_rows(rng, events)]).sort("event_ts", "session_id", "position")

    # a catalog row whose file is missing, and one whose file is not an image
    broken = catalog.sample(n=2, seed=seed)
    (out / "images" / broken["path"][0]).unlink()
    (out / "images" / broken["path"][1]).write_bytes(b"this is not a png")

    truth = out / "truth"
    truth.mkdir(exist_ok=True)
    duplicates.write_parquet(truth / "duplicates.parquet")
    events.select("query", "image_id", "relevance").unique().sort("query", "image_id").write_parquet(
        truth / "relevance.parquet")
    catalog.select("image_id", "product_id", "category", "colour", "pattern", "model_number",
                   pl.col("title").is_null().alias("untitled")).write_parquet(truth / "products.parquet")
    # which raw queries describe a product and which name its model number (and which one)
    queries.write_parquet(truth / "queries.parquet")
    (truth / "propensities.json").write_text(json.dumps(
        {"positions": list(range(1, RESULTS_PER_QUERY + 1)), "examination": true_propensities()}, indent=2))
    (truth / "planted.json").write_text(json.dumps(
        {"broken_images": broken["image_id"].to_list(), "bot_sessions": ["S_BOT_0001"],
         "bad_event_rows": {"empty_query": 2, "bad_position": 2, "unknown_image": 1, "duplicate": 1,
                            "query_too_long": 1}}, indent=2))

    catalog.select("image_id", "path", "product_id", "title", "category").write_parquet(
        out / "images.parquet")
    events = events.drop("relevance").with_columns(pl.col("event_ts").dt.date().alias("date"))
    events.write_parquet(out / "events", partition_by="date")
    return DemoSummary(out, products, catalog.height, events.height, duplicates.height)
