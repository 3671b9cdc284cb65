"""Synthetic H&M data with learnable structure, and the oracle a real dataset cannot give.

``generate(out, scale, seed)`` writes ``articles.csv``, ``customers.csv`` and
``transactions_train.csv`` byte-compatible with the Kaggle files (see
``hm_recsys.data.schema`` and ``hm_recsys.data.hmcsv``), plus ``oracle/``:

* ``oracle/top100_<YYYY-MM-DD>.parquet``: for each buyer of that H&M week, the
  100 articles with the highest TRUE purchase probability (the very
  probabilities the week's purchases were sampled from), for the validation
  week, the holdout week (the last complete week) and one hidden week after
  the data;
* ``oracle/future_transactions.csv``: the hidden week's purchases, H&M format
  (like Kaggle's hidden test week);
* ``oracle/stats.json`` and ``oracle/README.txt``.

The simulated world (all of it seeded; one ``numpy.random.Generator``):

* Articles belong to a product (1..n colour variants), an index group, a
  product-type cluster (tops, bottoms, ...), a *style* (a group of ~250
  articles inside one index-group x cluster cell with its own colour and
  price-band profile), a colour and a price band. Each has a long-tail base
  popularity (log-normal) and a lifecycle: launch week, then exponential decay
  (a few are evergreen); ~0.6% of the catalogue launches every week.
  Attractiveness(article, week) = base x lifecycle x cluster seasonality x noise.
* Customers have a sparse taste mixture: a global component (what everyone
  buys), their index group, one index-group x cluster cell, and 2-5 styles
  drawn by their colour, price-band and cluster preferences; plus a small
  repeat component (re-buy one of their last 8 purchases).
* One item of a customer's basket in week w: pick a component with the
  customer's weights (cluster seasonality scales style weights), then an
  article inside it proportionally to attractiveness. So
  ``P(article | customer, week) = sum_k w_k * attract(a) / Z_k(w) + w_rep * share_in_last_8``.
  That probability is what the oracle ranks by ("prob": the probability that
  one item the customer buys that week is that article; it sums to 1 over all
  articles).
* Customers buy in a week with probability ``1 - exp(-lambda_c * volume(w))``
  (heavy-tailed lambda), starting at their first-purchase week (every
  customer in customers.csv buys at least once by the hidden week; ~0.25% of
  the base are brand-new each week). A basket has ``1 + Poisson(mu_c)``
  items, each sometimes several units (exact duplicate rows), mostly on one
  day and one channel (a per-customer online preference).

Why the oracle top-100 is exact and cheap: inside every component, articles
are ordered by the same attractiveness, and the components are nested
(global > index group > cell > style). An article outside the top-100 of the
finest component containing it is beaten by 100 articles that belong to
every component it belongs to, so the union of each component's top-100,
plus the customer's last 8 purchases, always contains the true top-100.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from hm_recsys.arrays import unique
from hm_recsys.data import schema

WEEK = dt.timedelta(days=7)
ORACLE_TOP = 100
RING = 8  # how many recent purchases a customer "remembers" for repeats
_ORACLE_PREFIX = "top100_"


# ==========================================================================
# Scales and knobs
# ==========================================================================
@dataclasses.dataclass(frozen=True)
class Scale:
    customers: int
    articles: int
    weeks: int  # complete H&M weeks of data, ending on 2020-09-22 (a Tuesday)


SCALES: dict[str, Scale] = {
    "tiny": Scale(customers=2_000, articles=500, weeks=45),
    "small": Scale(customers=50_000, articles=5_000, weeks=52),
    "full": Scale(customers=1_371_980, articles=105_542, weeks=105),
}


@dataclasses.dataclass(frozen=True)
class Knobs:
    """The behavioural parameters, with the value each one was calibrated to (see docs/data-generator.md)."""

    style_size: int = 250  # articles per style (the finest taste unit)
    launch_share_per_week: float = 0.0057  # share of the catalogue launched each week
    prelaunch_weeks: int = 78  # pre-existing articles launched up to this many weeks before the data
    base_pop_sigma: float = 1.4  # log-normal sigma of product popularity (long tail)
    variant_pop_sigma: float = 0.3  # spread of popularity between colour variants of a product
    decay_median_weeks: float = 22.0  # median lifecycle decay constant (exponential after launch)
    evergreen_share: float = 0.10  # products that barely decay (basics)
    attract_noise_sigma: float = 0.15  # week-to-week noise on each article's attractiveness
    join_share_per_week: float = 0.0025  # brand-new customers per week, as a share of the base
    activity_shape: float = 2.0  # Gamma shape of the weekly purchase rate across customers
    activity_mean: float = 0.05  # mean weekly purchase rate
    extra_items_mean: float = 2.8  # basket = 1 + Poisson(mu_c), E[mu_c] = this
    extra_units_rate: float = 0.09  # each line has 1 + Poisson(rate) units (exact duplicate rows)
    other_day_share: float = 0.12  # share of a basket's lines bought on another day of the week
    online_share: float = 0.70  # mean of the per-customer online preference (Beta)
    global_weight: float = 0.30  # mean weight of the "what everyone buys" component
    group_weight: float = 0.16  # mean weight of the customer's index-group component
    cell_weight: float = 0.12  # weight of the customer's index-group x cluster cell
    repeat_weight: float = 0.01  # mean weight of re-buying one of the last 8 purchases
    max_styles: int = 5  # styles per customer: 2 + Poisson(1.2), capped here


KNOBS = Knobs()


# ==========================================================================
# Vocabularies (invented, shaped like the real ones)
# ==========================================================================
# (index_group_no, index_group_name, share of articles)
INDEX_GROUPS = [
    (1, "Ladieswear", 0.27),
    (2, "Divided", 0.15),
    (3, "Menswear", 0.12),
    (4, "Baby/Children", 0.36),
    (26, "Sport", 0.10),
]
IG_NAMES = [g[1] for g in INDEX_GROUPS]
N_IG = len(INDEX_GROUPS)

# (index_code, index_name, index group position)
INDEXES = [
    ("A", "Ladieswear", 0),
    ("B", "Lingeries/Tights", 0),
    ("C", "Ladies Accessories", 0),
    ("D", "Divided", 1),
    ("F", "Menswear", 2),
    ("G", "Baby Sizes 50-98", 3),
    ("H", "Children Sizes 92-140", 3),
    ("I", "Children Sizes 134-170", 3),
    ("J", "Children Accessories, Swimwear", 3),
    ("S", "Sport", 4),
]
CLUSTERS = ["tops", "bottoms", "dresses", "outerwear", "underwear", "swimwear", "accessories", "shoes", "socks"]
N_CL = len(CLUSTERS)
# product types per cluster: (product_type_no, product_type_name, product_group_name, garment_group)
PRODUCT_TYPES = {
    "tops": [
        (253, "Vest top", "Garment Upper body", "Jersey Basic"),
        (255, "T-shirt", "Garment Upper body", "Jersey Basic"),
        (254, "Top", "Garment Upper body", "Jersey Fancy"),
        (252, "Sweater", "Garment Upper body", "Knitwear"),
        (259, "Shirt", "Garment Upper body", "Shirts"),
        (258, "Blouse", "Garment Upper body", "Blouses"),
        (245, "Hoodie", "Garment Upper body", "Jersey Fancy"),
    ],
    "bottoms": [
        (272, "Trousers", "Garment Lower body", "Trousers"),
        (274, "Shorts", "Garment Lower body", "Shorts"),
        (275, "Skirt", "Garment Lower body", "Skirts"),
        (273, "Leggings/Tights", "Garment Lower body", "Jersey Basic"),
        (277, "Jeans", "Garment Lower body", "Trousers Denim"),
    ],
    "dresses": [
        (265, "Dress", "Garment Full body", "Dresses Ladies"),
        (267, "Jumpsuit/Playsuit", "Garment Full body", "Dressed"),
        (270, "Garment Set", "Garment Full body", "Jersey Fancy"),
    ],
    "outerwear": [
        (262, "Jacket", "Garment Upper body", "Outdoor"),
        (264, "Coat", "Garment Upper body", "Outdoor"),
        (257, "Cardigan", "Garment Upper body", "Knitwear"),
        (260, "Blazer", "Garment Upper body", "Dressed"),
    ],
    "underwear": [
        (306, "Bra", "Underwear", "Under-, Nightwear"),
        (286, "Underwear bottom", "Underwear", "Under-, Nightwear"),
        (298, "Pyjama set", "Nightwear", "Under-, Nightwear"),
        (296, "Underwear body", "Underwear", "Under-, Nightwear"),
    ],
    "swimwear": [
        (59, "Swimwear bottom", "Swimwear", "Swimwear"),
        (57, "Bikini top", "Swimwear", "Swimwear"),
        (60, "Swimsuit", "Swimwear", "Swimwear"),
    ],
    "accessories": [
        (66, "Bag", "Accessories", "Accessories"),
        (67, "Earring", "Accessories", "Accessories"),
        (72, "Hat/beanie", "Accessories", "Accessories"),
        (71, "Scarf", "Accessories", "Accessories"),
        (87, "Sunglasses", "Accessories", "Accessories"),
        (68, "Hair clip", "Accessories", "Accessories"),
    ],
    "shoes": [
        (94, "Sneakers", "Shoes", "Shoes"),
        (93, "Boots", "Shoes", "Shoes"),
        (96, "Sandals", "Shoes", "Shoes"),
        (99, "Ballerinas", "Shoes", "Shoes"),
    ],
    "socks": [
        (302, "Socks", "Socks & Tights", "Socks and Tights"),
        (304, "Underwear Tights", "Socks & Tights", "Socks and Tights"),
    ],
}
GARMENT_GROUPS = {
    "Jersey Basic": 1002,
    "Knitwear": 1003,
    "Jersey Fancy": 1005,
    "Outdoor": 1007,
    "Dressed": 1008,
    "Trousers": 1009,
    "Blouses": 1010,
    "Shirts": 1011,
    "Trousers Denim": 1012,
    "Dresses Ladies": 1013,
    "Skirts": 1016,
    "Under-, Nightwear": 1017,
    "Swimwear": 1018,
    "Accessories": 1019,
    "Shoes": 1020,
    "Socks and Tights": 1021,
    "Shorts": 1025,
}
# share of each cluster inside each index group (rows follow INDEX_GROUPS)
CLUSTER_SHARE = np.array(
    [
        [0.28, 0.14, 0.12, 0.08, 0.14, 0.06, 0.10, 0.03, 0.05],  # Ladieswear
        [0.30, 0.18, 0.14, 0.08, 0.06, 0.05, 0.12, 0.04, 0.03],  # Divided
        [0.36, 0.22, 0.00, 0.12, 0.10, 0.05, 0.08, 0.04, 0.03],  # Menswear
        [0.30, 0.20, 0.10, 0.08, 0.10, 0.06, 0.08, 0.03, 0.05],  # Baby/Children
        [0.35, 0.30, 0.02, 0.12, 0.10, 0.05, 0.04, 0.00, 0.02],  # Sport
    ]
)
# seasonality per cluster: (amplitude, peak day of year)
CLUSTER_SEASON = [(0.10, 120), (0.08, 250), (0.40, 180), (0.50, 320), (0.05, 340), (0.90, 170), (0.15, 340), (0.20, 90), (0.25, 330)]

# perceived colour masters: (id, name, share of articles)
COLOUR_MASTERS = [
    (5, "Black", 0.22),
    (2, "Blue", 0.15),
    (9, "White", 0.11),
    (12, "Grey", 0.08),
    (11, "Beige", 0.08),
    (4, "Pink", 0.07),
    (18, "Red", 0.05),
    (19, "Green", 0.05),
    (20, "Khaki green", 0.04),
    (8, "Yellow", 0.04),
    (1, "Brown", 0.04),
    (3, "Orange", 0.03),
    (6, "Lilac Purple", 0.02),
    (7, "Turquoise", 0.02),
]
N_COL = len(COLOUR_MASTERS)
# colour groups: (colour_group_code, colour_group_name, master position, perceived_colour_value_id)
COLOUR_GROUPS = [
    ("09", "Black", 0, 4),
    ("73", "Dark Blue", 1, 4),
    ("71", "Light Blue", 1, 3),
    ("72", "Blue", 1, 7),
    ("10", "White", 2, 3),
    ("11", "Off White", 2, 1),
    ("07", "Grey", 3, 2),
    ("06", "Light Grey", 3, 3),
    ("08", "Dark Grey", 3, 4),
    ("13", "Beige", 4, 1),
    ("12", "Light Beige", 4, 3),
    ("52", "Pink", 5, 7),
    ("51", "Light Pink", 5, 3),
    ("53", "Dark Pink", 5, 4),
    ("42", "Red", 6, 5),
    ("43", "Dark Red", 6, 4),
    ("62", "Dark Green", 7, 4),
    ("61", "Light Green", 7, 3),
    ("19", "Greenish Khaki", 8, 2),
    ("21", "Light Yellow", 9, 3),
    ("23", "Dark Yellow", 9, 4),
    ("17", "Yellowish Brown", 10, 2),
    ("33", "Dark Orange", 11, 4),
    ("32", "Orange", 11, 5),
    ("63", "Purple", 12, 7),
    ("81", "Light Turquoise", 13, 3),
]
COLOUR_VALUES = {1: "Dusty Light", 2: "Medium Dusty", 3: "Light", 4: "Dark", 5: "Bright", 7: "Medium"}
# graphical appearance: (no, name, share)
GRAPHICAL = [
    (1010016, "Solid", 0.46),
    (1010001, "All over pattern", 0.14),
    (1010010, "Melange", 0.06),
    (1010017, "Stripe", 0.05),
    (1010004, "Denim", 0.05),
    (1010014, "Placement print", 0.06),
    (1010008, "Front print", 0.04),
    (1010021, "Lace", 0.02),
    (1010002, "Application/3D", 0.02),
    (1010005, "Dot", 0.02),
    (1010007, "Embroidery", 0.02),
    (1010009, "Jacquard", 0.02),
    (1010023, "Check", 0.02),
    (1010015, "Sequin", 0.02),
]
# price bands: local prices (x.99); a price is local / 590 in the file.
PRICE_POINTS = [
    [499, 699, 799, 999, 1299],
    [1499, 1799, 1999, 2499],
    [2999, 3499, 3999, 4999],
    [5999, 6999, 7999, 9999, 12999, 14999, 19999, 24999],
]
N_BAND = len(PRICE_POINTS)
MARKDOWN = (1.0, 0.6, 0.4)  # list price, first markdown, clearance
BAND_SHARE_BY_IG = np.array(
    [
        [0.25, 0.35, 0.28, 0.12],
        [0.45, 0.38, 0.14, 0.03],
        [0.25, 0.35, 0.28, 0.12],
        [0.35, 0.40, 0.20, 0.05],
        [0.20, 0.35, 0.30, 0.15],
    ]
)
SECTION_WORD = {
    0: "Womens",
    1: "Divided",
    2: "Mens",
    3: "Kids",
    4: "Ladies H&M Sport",
}
SECTION_TOPIC = {
    "tops": "Tops",
    "bottoms": "Trousers",
    "dresses": "Dresses",
    "outerwear": "Outerwear",
    "underwear": "Lingerie",
    "swimwear": "Swimwear",
    "accessories": "Accessories",
    "shoes": "Shoes",
    "socks": "Nightwear, Socks & Tights",
}
NAME_WORDS = (
    "Tilly Luna Perrie Jade Moa Cheryl Timeless Skye Hailey Kelly Mia Nora Ellie Bella Sara Vera Pluto Rome Atlas "
    "Dakota Ivy Wilma Gemma Ozzy Hudson Rocky Milo Harvey Cleo Stella Nova Ida Leia Tove Alba Svea Kira Lola Frida"
).split()
FABRICS = ["soft cotton jersey", "viscose", "ribbed jersey", "sweatshirt fabric", "denim", "woven fabric", "chunky-knit wool blend", "lyocell", "satin", "recycled polyester"]
FEATURES = ["a round neckline", "long sleeves", "short sleeves", "an elasticated waist", "side pockets", "a concealed zip", "a V-neck", "adjustable straps", "a drawstring hem", "press-studs", "a wide cut", "a slim fit", "dropped shoulders", "a collar", "raw-edge hems"]

# a few exact real-looking literals that tests and validation rely on
CLUB_STATUS = (("ACTIVE", 0.9283), ("PRE-CREATE", 0.0674), ("LEFT CLUB", 0.0003), ("", 0.0040))


# ==========================================================================
# Dates
# ==========================================================================
def data_weeks(scale: str | Scale) -> tuple[list[dt.date], dt.date, dt.date]:
    """``(week labels of the data, first date, hidden week label)`` for a scale.

    The data always ends on 2020-09-22 (a Tuesday); the hidden week is Kaggle's
    test week 2020-09-23. At full scale the first week starts on Thursday
    2018-09-20, like the real file.
    """
    sc = SCALES[scale] if isinstance(scale, str) else scale
    hidden = schema.KAGGLE_TEST_WEEK
    labels = [hidden - (sc.weeks - i) * WEEK for i in range(sc.weeks)]
    first = max(labels[0], schema.FIRST_DATE)
    return labels, first, hidden


# ==========================================================================
# Small helpers
# ==========================================================================
_HEX = np.array([f"{i:02x}".encode() for i in range(256)], dtype="S2")


def _hex_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` distinct random 64-hex ids as a sorted ``S64`` array."""
    raw = np.frombuffer(rng.bytes(32 * n), dtype=np.uint8).reshape(n, 32)
    ids = np.ascontiguousarray(_HEX[raw]).view("S64").ravel()
    ids = np.sort(ids)
    if n > 1 and np.any(ids[1:] == ids[:-1]):  # 2^-256 odds; checked because ids are a key
        raise RuntimeError("hex id collision; use another seed")
    return ids


def _categorical(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw per row of a (n, k) probability matrix (rows need not be normalised)."""
    cum = np.cumsum(probs, axis=1)
    u = rng.random(len(probs)) * cum[:, -1]
    return np.minimum((cum <= u[:, None]).sum(axis=1), probs.shape[1] - 1)


def _force_values(rng, values: np.ndarray, wanted: list[str]) -> None:
    """Make sure each literal in ``wanted`` occurs at least once (tiny scales would miss rare ones)."""
    for v in wanted:
        if not np.any(values == v):
            values[rng.integers(len(values))] = v


# ==========================================================================
# Catalogue
# ==========================================================================
def _build_catalog(rng: np.random.Generator, n_articles: int, n_weeks: int, k: Knobs):
    """Articles sorted by article_id; returns (DataFrame for articles.csv, dict of model arrays).

    Model arrays (length n_articles unless noted): ``ig``, ``cluster``, ``style``,
    ``coarse`` (ig x cluster cell id), ``colour`` (master position), ``band``,
    ``launch`` (week index, may be negative), ``base``, ``tau``, ``markdown_at``,
    ``price_idx`` (n, 3) into ``price_text`` (list of H&M price strings).
    """
    import pandas as pd

    from hm_recsys.data.hmcsv import price_string_from_cents

    # -- products and their variant counts (mean ~2.2 colours per product, as the real file)
    est = int(n_articles / 2.2) + 16
    variants = rng.geometric(0.45, size=est)
    while variants.sum() < n_articles:
        variants = np.concatenate([variants, rng.geometric(0.45, size=est)])
    cum = np.cumsum(variants)
    n_prod = int(np.searchsorted(cum, n_articles) + 1)
    variants = variants[:n_prod].copy()
    variants[-1] -= cum[n_prod - 1] - n_articles

    ig_share = np.array([g[2] for g in INDEX_GROUPS])
    p_ig = rng.choice(N_IG, size=n_prod, p=ig_share)
    p_cl = _categorical(rng, CLUSTER_SHARE[p_ig])
    # launch: a share of products launch during the data (and the hidden week), the rest before it
    share_new = min(0.9, k.launch_share_per_week * (n_weeks + 1))
    is_new = rng.random(n_prod) < share_new
    p_launch = np.where(is_new, rng.integers(0, n_weeks + 1, n_prod), rng.integers(-k.prelaunch_weeks, 0, n_prod))
    # product codes grow with launch time, as in the real file
    order = np.lexsort((rng.random(n_prod), p_launch))
    codes = np.sort(rng.choice(np.arange(108775, 959462), size=n_prod, replace=False))
    perm = np.empty(n_prod, dtype=np.int64)
    perm[order] = np.arange(n_prod)
    p_code = codes[perm]  # product i gets the perm[i]-th smallest code
    # reorder products by code so that articles come out sorted by article_id
    by_code = np.argsort(p_code, kind="stable")
    p_ig, p_cl, p_launch, p_code, variants = p_ig[by_code], p_cl[by_code], p_launch[by_code], p_code[by_code], variants[by_code]

    # -- cells (ig x cluster) and styles inside them
    p_coarse = p_ig * N_CL + p_cl
    cell_articles = np.bincount(p_coarse, weights=variants, minlength=N_IG * N_CL)
    n_styles_cell = np.maximum(1, np.rint(cell_articles / k.style_size)).astype(np.int64)
    style_offset = np.concatenate([[0], np.cumsum(n_styles_cell)])
    n_styles = int(style_offset[-1])
    p_style = style_offset[p_coarse] + (rng.random(n_prod) * n_styles_cell[p_coarse]).astype(np.int64)
    style_cell = np.repeat(np.arange(N_IG * N_CL), n_styles_cell)
    style_ig = style_cell // N_CL
    # each style has a colour profile (concentrated on a few masters) and a price-band profile
    col_share = np.array([c[2] for c in COLOUR_MASTERS])
    style_col = rng.dirichlet(col_share * 3.0, size=n_styles)
    main_band = _categorical(rng, BAND_SHARE_BY_IG[style_ig])
    style_band = np.full((n_styles, N_BAND), 0.04)
    style_band[np.arange(n_styles), main_band] = 0.80
    style_band /= style_band.sum(axis=1, keepdims=True)
    p_band = _categorical(rng, style_band[p_style])
    p_type_pos = np.array([rng.integers(len(PRODUCT_TYPES[CLUSTERS[c]])) for c in p_cl], dtype=np.int64)
    pp = [PRICE_POINTS[b] for b in p_band]
    p_price = np.array([pts[rng.integers(len(pts))] for pts in pp], dtype=np.int64)
    p_base = rng.lognormal(0.0, k.base_pop_sigma, n_prod)
    evergreen = rng.random(n_prod) < k.evergreen_share
    p_tau = np.where(evergreen, 80.0, k.decay_median_weeks * rng.lognormal(0.0, 0.6, n_prod))
    p_markdown = 8 + rng.geometric(1 / 8, n_prod)
    # index inside the index group
    p_index = np.empty(n_prod, dtype=np.int64)
    for gi in range(N_IG):
        m = p_ig == gi
        if gi == 0:
            p_index[m] = np.where(np.isin(p_cl[m], [4, 8]), 1, np.where(p_cl[m] == 6, 2, 0))
        elif gi == 3:
            kids = rng.choice([5, 6, 7], size=int(m.sum()), p=[0.35, 0.4, 0.25])
            p_index[m] = np.where(np.isin(p_cl[m], [5, 6]), 8, kids)
        else:
            p_index[m] = {1: 3, 2: 4, 4: 9}[gi]

    # -- articles (variants): expand products
    prod_of = np.repeat(np.arange(n_prod), variants)
    n = n_articles
    first_of_prod = np.concatenate([[0], np.cumsum(variants)[:-1]])
    v_pos = np.arange(n) - first_of_prod[prod_of]
    # variant suffixes 001, 002, ... with an occasional gap, as in the real file
    gaps = np.where(v_pos == 0, 1, 1 + (rng.random(n) < 0.1) * rng.integers(1, 15, n))
    csum = np.cumsum(gaps)
    v_suffix = csum - (csum[first_of_prod] - 1)[prod_of]
    a_style = p_style[prod_of]
    a_colour = _categorical(rng, style_col[a_style])
    # colour group inside the master
    groups_of_master = [[i for i, g in enumerate(COLOUR_GROUPS) if g[2] == m] for m in range(N_COL)]
    a_cgroup = np.array([groups_of_master[m][rng.integers(len(groups_of_master[m]))] for m in a_colour])
    a_graph = rng.choice(len(GRAPHICAL), size=n, p=np.array([g[2] for g in GRAPHICAL]) / sum(g[2] for g in GRAPHICAL))
    black_boost = np.where(a_colour == 0, 1.5, 1.0)
    a_base = p_base[prod_of] * rng.lognormal(0.0, k.variant_pop_sigma, n) * black_boost

    ids = np.char.add(np.char.zfill(p_code[prod_of].astype("U7"), 7), np.char.zfill(v_suffix.astype("U3"), 3))
    if len(set(ids.tolist())) != n:
        raise RuntimeError("article id collision")

    # -- price text table: list price and markdowns, local cents -> H&M string
    price_cents = np.stack([np.maximum(99, (p_price[prod_of] * f).astype(np.int64) // 100 * 100 + 99) for f in MARKDOWN], axis=1)
    price_cents[:, 0] = p_price[prod_of]
    uniq, inv = np.unique(price_cents, return_inverse=True)
    price_text = [price_string_from_cents(int(c)) for c in uniq]
    price_idx = inv.reshape(n, len(MARKDOWN)).astype(np.int32)

    # -- the CSV frame
    a_cl = p_cl[prod_of]
    a_ig = p_ig[prod_of]
    a_index = p_index[prod_of]
    type_rows = [PRODUCT_TYPES[CLUSTERS[c]][t] for c, t in zip(p_cl, p_type_pos, strict=True)]
    p_type_no = np.array([t[0] for t in type_rows])
    p_type_name = np.array([t[1] for t in type_rows], dtype=object)
    p_group_name = np.array([t[2] for t in type_rows], dtype=object)
    p_garment = np.array([t[3] for t in type_rows], dtype=object)
    # departments: one per (index, garment group); sections: one per (index group, cluster)
    dept_key = np.char.add(np.array([INDEXES[i][0] for i in p_index]), p_garment.astype(str))
    dkeys, dinv = np.unique(dept_key, return_inverse=True)
    dept_nos = np.sort(rng.choice(np.arange(1201, 9999), size=len(dkeys), replace=False))
    dept_names = [f"{k_[1:]} {INDEXES['ABCDFGHIJS'.index(k_[0])][1].split(' ')[0]}" for k_ in dkeys]
    sec_key = p_ig * N_CL + p_cl
    skeys, sinv = np.unique(sec_key, return_inverse=True)
    sec_nos = rng.choice(np.arange(2, 99), size=len(skeys), replace=False)
    sec_names = [f"{SECTION_WORD[s // N_CL]} {SECTION_TOPIC[CLUSTERS[s % N_CL]]}" for s in skeys]
    p_name = np.array(
        [f"{NAME_WORDS[rng.integers(len(NAME_WORDS))]} {t[1].lower()}" for t in type_rows], dtype=object
    )
    p_desc = np.array(
        [
            "{} in {} with {}, {} and {}.".format(
                t[1], FABRICS[rng.integers(len(FABRICS))], *(FEATURES[i] for i in rng.choice(len(FEATURES), 3, replace=False))
            )
            + (' Part of the "Conscious" collection.' if rng.random() < 0.03 else "")
            for t in type_rows
        ],
        dtype=object,
    )
    p_desc[rng.random(n_prod) < 0.004] = ""
    if n_prod > 1 and not np.any(p_desc == ""):
        p_desc[rng.integers(n_prod)] = ""  # the real file has empty detail_desc; so does every scale
    cg = [COLOUR_GROUPS[i] for i in a_cgroup]
    df = pd.DataFrame(
        {
            "article_id": ids,
            "product_code": np.char.zfill(p_code[prod_of].astype("U7"), 7),
            "prod_name": p_name[prod_of],
            "product_type_no": p_type_no[prod_of],
            "product_type_name": p_type_name[prod_of],
            "product_group_name": p_group_name[prod_of],
            "graphical_appearance_no": np.array([GRAPHICAL[g][0] for g in a_graph]),
            "graphical_appearance_name": np.array([GRAPHICAL[g][1] for g in a_graph], dtype=object),
            "colour_group_code": np.array([c[0] for c in cg], dtype=object),
            "colour_group_name": np.array([c[1] for c in cg], dtype=object),
            "perceived_colour_value_id": np.array([c[3] for c in cg]),
            "perceived_colour_value_name": np.array([COLOUR_VALUES[c[3]] for c in cg], dtype=object),
            "perceived_colour_master_id": np.array([COLOUR_MASTERS[m][0] for m in a_colour]),
            "perceived_colour_master_name": np.array([COLOUR_MASTERS[m][1] for m in a_colour], dtype=object),
            "department_no": dept_nos[dinv][prod_of],
            "department_name": np.array(dept_names, dtype=object)[dinv][prod_of],
            "index_code": np.array([INDEXES[i][0] for i in a_index], dtype=object),
            "index_name": np.array([INDEXES[i][1] for i in a_index], dtype=object),
            "index_group_no": np.array([INDEX_GROUPS[g][0] for g in a_ig]),
            "index_group_name": np.array([INDEX_GROUPS[g][1] for g in a_ig], dtype=object),
            "section_no": sec_nos[sinv][prod_of],
            "section_name": np.array(sec_names, dtype=object)[sinv][prod_of],
            "garment_group_no": np.array([GARMENT_GROUPS[g] for g in p_garment])[prod_of],
            "garment_group_name": p_garment[prod_of],
            "detail_desc": p_desc[prod_of],
        }
    )
    model = {
        "ids": ids.astype("S10"),
        "ig": a_ig,
        "cluster": a_cl,
        "coarse": a_ig * N_CL + a_cl,
        "style": a_style,
        "n_styles": n_styles,
        "style_cell": style_cell,
        "style_col": style_col,
        "style_band": style_band,
        "colour": a_colour,
        "band": p_band[prod_of],
        "launch": p_launch[prod_of],
        "base": a_base,
        "tau": p_tau[prod_of],
        "markdown_at": p_markdown[prod_of],
        "price_idx": price_idx,
        "price_text": price_text,
    }
    return df, model


# ==========================================================================
# Customers
# ==========================================================================
def _build_customers(rng: np.random.Generator, n: int, n_weeks: int, cat: dict, k: Knobs):
    """Customers sorted by customer_id; returns (pyarrow table for customers.csv, dict of model arrays).

    Model arrays: ``ids`` (S64), ``comp_set`` (n, 3 + max_styles) int32 ids of
    the taste components (see ``_Sets``; -1 = unused), ``comp_w`` float64 their
    weights, ``rep_w`` repeat weight, ``lam`` weekly purchase rate, ``mu``
    extra items per basket, ``p_online``, ``first_week`` (week index of the first
    purchase in the data, 0..n_weeks).
    """
    import pyarrow as pa

    from hm_recsys.data.hmcsv import fixed_width_strings

    ids = _hex_ids(rng, n)
    # age: two modes (~23 and ~50), as the real file
    young = rng.random(n) < 0.55
    age = np.where(young, rng.normal(24, 4.5, n), rng.normal(50, 11, n))
    age = np.clip(np.rint(age), schema.AGE_MIN, schema.AGE_MAX).astype(np.int64)
    # main index group depends on age (young: Divided; 30-45: Baby/Children)
    ig_by_age = np.array(
        [
            [0.40, 0.32, 0.12, 0.06, 0.10],
            [0.38, 0.06, 0.13, 0.33, 0.10],
            [0.52, 0.04, 0.16, 0.18, 0.10],
        ]
    )
    age_band = np.where(age < 30, 0, np.where(age < 46, 1, 2))
    main_ig = _categorical(rng, ig_by_age[age_band])
    cl_pref = rng.dirichlet(np.full(N_CL, 0.7), size=n)
    col_share = np.array([c[2] for c in COLOUR_MASTERS])
    col_pref = rng.dirichlet(col_share * 4.0, size=n)
    band_main = _categorical(rng, BAND_SHARE_BY_IG[main_ig] * np.where(age_band[:, None] == 2, [0.7, 1, 1.2, 1.4], 1.0))
    band_pref = np.full((n, N_BAND), 0.1)
    band_pref[np.arange(n), band_main] = 1.0

    sets = _Sets.layout(cat)
    n_st = k.max_styles
    comp_set = np.full((n, 3 + n_st), -1, dtype=np.int32)
    comp_w = np.zeros((n, 3 + n_st))
    comp_set[:, 0] = 0
    comp_set[:, 1] = sets.ig_set(main_ig)
    main_cl = _categorical(rng, cl_pref * CLUSTER_SHARE[main_ig])
    comp_set[:, 2] = sets.coarse_set(main_ig * N_CL + main_cl)
    # styles: index group (mostly the main one), cluster by preference, then a style of that
    # cell by colour and price-band affinity (and style size)
    n_styles_c = np.minimum(n_st, 2 + rng.poisson(1.2, n))
    other_ig = _categorical(rng, ig_by_age[age_band])
    style_size = np.bincount(cat["style"], minlength=cat["n_styles"]).astype(float)
    cell_styles = [np.flatnonzero(cat["style_cell"] == c) for c in range(N_IG * N_CL)]
    for j in range(n_st):
        ig_j = np.where(rng.random(n) < 0.85, main_ig, other_ig)
        cl_j = _categorical(rng, cl_pref * CLUSTER_SHARE[ig_j] + 1e-12)
        cell_j = ig_j * N_CL + cl_j
        st_j = np.empty(n, dtype=np.int64)
        for c in np.unique(cell_j):
            who = np.flatnonzero(cell_j == c)
            cand = cell_styles[c]
            aff = (col_pref[who] @ cat["style_col"][cand].T) * (band_pref[who] @ cat["style_band"][cand].T)
            aff = aff**2 * style_size[cand]
            st_j[who] = cand[_categorical(rng, aff + 1e-300)]
        comp_set[:, 3 + j] = np.where(j < n_styles_c, sets.style_set(st_j), -1)
    rep_w = np.minimum(0.25, k.repeat_weight * rng.gamma(2.0, 0.5, n))
    g_w = k.global_weight * rng.gamma(4.0, 0.25, n)
    i_w = k.group_weight * rng.gamma(4.0, 0.25, n)
    c_w = np.full(n, k.cell_weight)
    rest = np.clip(1.0 - rep_w - g_w - i_w - c_w, 0.1, None)
    st_w = rng.dirichlet(np.ones(n_st), size=n) * (comp_set[:, 3:] >= 0)
    st_w = st_w / st_w.sum(axis=1, keepdims=True) * rest[:, None]
    comp_w[:, 0], comp_w[:, 1], comp_w[:, 2] = g_w, i_w, c_w
    comp_w[:, 3:] = st_w
    total = comp_w.sum(axis=1) + rep_w
    comp_w /= total[:, None]
    rep_w = rep_w / total

    # activity and first purchase week (every customer buys at least once by the hidden week)
    lam = rng.gamma(k.activity_shape, k.activity_mean / k.activity_shape, n)
    joins = rng.random(n) < min(0.95, k.join_share_per_week * (n_weeks + 1))
    u = rng.random(n)
    p = -np.expm1(-lam)
    horizon = n_weeks + 1
    # truncated geometric on 0..n_weeks: first week a pre-existing customer shows up
    tail = np.exp(horizon * np.log1p(-np.minimum(p, 1 - 1e-12)))
    geo = np.floor(np.log1p(-u * (1 - tail)) / np.log1p(-np.minimum(p, 1 - 1e-12)))
    first = np.where(joins, rng.integers(0, horizon, n), np.clip(geo, 0, n_weeks)).astype(np.int32)
    mu = rng.gamma(2.0, k.extra_items_mean / 2.0, n)
    p_online = rng.beta(2.0 * k.online_share / (1 - k.online_share) * 0.6, 0.6 * 2.0, n)

    # -- the CSV columns
    fn = np.where(rng.random(n) < 0.346, "1.0", "")
    active = np.where((fn == "1.0") & (rng.random(n) < 0.975), "1.0", "")
    club = rng.choice([c[0] for c in CLUB_STATUS], size=n, p=np.array([c[1] for c in CLUB_STATUS]) / sum(c[1] for c in CLUB_STATUS))
    # newsletter readers are the FN=1.0 customers, as in the real file
    news = np.where(
        fn == "1.0",
        rng.choice(["Regularly", "Monthly", "NONE"], size=n, p=[0.985, 0.002, 0.013]),
        rng.choice(["NONE", "", "Regularly", "None"], size=n, p=[0.9785, 0.018, 0.0034, 0.0001]),
    )
    _force_values(rng, club, ["ACTIVE", "PRE-CREATE", "LEFT CLUB", ""])
    _force_values(rng, news, ["NONE", "Regularly", "Monthly", "None", ""])
    age_txt = age.astype(str).astype(object)
    age_txt[rng.random(n) < 0.0116] = ""
    if not np.any(age_txt == ""):
        age_txt[rng.integers(n)] = ""
    # postal codes: one code holds ~8.8% of customers (the real file's placeholder), the rest a long tail
    n_codes = max(2, n // 4)
    codes = _hex_ids(rng, n_codes)
    zipf = 1.0 / np.arange(1, n_codes) ** 0.5
    tail_code = 1 + rng.choice(n_codes - 1, size=n, p=zipf / zipf.sum())
    code_of = np.where(rng.random(n) < 0.088, 0, tail_code)
    table = pa.table(
        {
            "customer_id": fixed_width_strings(ids),
            "FN": pa.array(fn, pa.string()),
            "Active": pa.array(active, pa.string()),
            "club_member_status": pa.array(club, pa.string()),
            "fashion_news_frequency": pa.array(news, pa.string()),
            "age": pa.array(age_txt, pa.string()),
            "postal_code": fixed_width_strings(codes[code_of]),
        }
    )
    model = {
        "ids": ids,
        "ids_arrow": table.column("customer_id").combine_chunks(),
        "comp_set": comp_set,
        "comp_w": comp_w,
        "rep_w": rep_w,
        "lam": lam,
        "mu": mu,
        "p_online": p_online,
        "first_week": first,
    }
    return table, model


# ==========================================================================
# Component sets: global, index group, cell (ig x cluster), style
# ==========================================================================
@dataclasses.dataclass
class _Sets:
    """Nested article sets that taste components draw from, with per-week sampling tables.

    Set ids: 0 = all articles; 1..5 = index groups; then the ig x cluster
    cells; then the styles. ``level_of_article`` (4, n_articles) gives, for each
    level, the set id an article belongs to.
    """

    n_sets: int
    ig_off: int
    coarse_off: int
    style_off: int
    set_cluster: np.ndarray  # cluster of a set (-1 for global / index-group sets)
    members: np.ndarray  # article ids grouped by set id
    member_set: np.ndarray
    level_of_article: np.ndarray

    @classmethod
    def layout(cls, cat: dict) -> _Sets:
        n = len(cat["ig"])
        ig_off, coarse_off = 1, 1 + N_IG
        style_off = coarse_off + N_IG * N_CL
        n_sets = style_off + cat["n_styles"]
        level = np.stack([np.zeros(n, np.int64), ig_off + cat["ig"], coarse_off + cat["coarse"], style_off + cat["style"]])
        member_set = level.ravel()
        art = np.tile(np.arange(n), 4)
        order = np.argsort(member_set, kind="stable")
        set_cluster = np.full(n_sets, -1)
        set_cluster[coarse_off : coarse_off + N_IG * N_CL] = np.arange(N_IG * N_CL) % N_CL
        set_cluster[style_off:] = cat["style_cell"] % N_CL
        return cls(n_sets, ig_off, coarse_off, style_off, set_cluster, art[order], member_set[order], level)

    def ig_set(self, ig):
        return self.ig_off + np.asarray(ig)

    def coarse_set(self, cell):
        return self.coarse_off + np.asarray(cell)

    def style_set(self, style):
        return self.style_off + np.asarray(style)


@dataclasses.dataclass
class _WeekTables:
    """One week's sampling tables: only articles with attractiveness > 0 take part."""

    attract: np.ndarray  # (n_articles,)
    members: np.ndarray  # alive members grouped by set
    cum: np.ndarray  # cumulative attractiveness over ``members``
    start: np.ndarray  # (n_sets,) first position of each set in ``members``
    end: np.ndarray
    base: np.ndarray  # cumulative value before each set
    z: np.ndarray  # total attractiveness of each set
    set_mult: np.ndarray  # (n_sets,) seasonal weight of a component; 0 if its set is empty

    @classmethod
    def build(cls, sets: _Sets, attract: np.ndarray, season_cl: np.ndarray) -> _WeekTables:
        alive = attract[sets.members] > 0
        members = sets.members[alive]
        mset = sets.member_set[alive]
        counts = np.bincount(mset, minlength=sets.n_sets)
        end = np.cumsum(counts)
        start = end - counts
        cum = np.cumsum(attract[members])
        cum_ext = np.concatenate([[0.0], cum])
        base = cum_ext[start]
        z = cum_ext[end] - base
        mult = np.where(sets.set_cluster >= 0, season_cl[np.maximum(sets.set_cluster, 0)], 1.0) * (counts > 0)
        return cls(attract, members, cum, start, end, base, z, mult)

    def sample(self, set_ids: np.ndarray, u: np.ndarray) -> np.ndarray:
        """One article per (set id, uniform) pair, proportionally to attractiveness inside the set."""
        target = self.base[set_ids] + u * self.z[set_ids]
        pos = np.searchsorted(self.cum, target, side="right")
        pos = np.clip(pos, self.start[set_ids], self.end[set_ids] - 1)
        return self.members[pos]

    def top(self, sets: _Sets, k: int) -> np.ndarray:
        """(n_sets, k) the k most attractive articles of each set (-1 padded)."""
        att = self.attract[self.members]
        mset = np.repeat(np.arange(sets.n_sets), self.end - self.start)
        order = np.lexsort((self.members, -att, mset))
        rank = np.arange(len(order)) - self.start[mset[order]]
        keep = rank < k
        out = np.full((sets.n_sets, k), -1, dtype=np.int64)
        out[mset[order][keep], rank[keep]] = self.members[order][keep]
        return out


# ==========================================================================
# The world in one week
# ==========================================================================
def _season(day: dt.date, amp: float, peak: int) -> float:
    return 1.0 + amp * math.cos(2 * math.pi * (day.timetuple().tm_yday - peak) / 365.25)


def _volume(week_label: dt.date) -> float:
    """Overall weekly demand: a mild yearly wave, Black Friday and the summer sale."""
    mid = week_label + dt.timedelta(days=3)
    v = _season(mid, 0.10, 175)
    if mid.month == 11 and 21 <= mid.day <= 30:
        v *= 1.35
    if mid.month == 6 and mid.day >= 20 or mid.month == 7 and mid.day <= 5:
        v *= 1.2
    return v


DOW_WEIGHTS = np.array([0.135, 0.13, 0.15, 0.17, 0.16, 0.125, 0.13])  # Wed..Tue


class _World:
    def __init__(self, cat: dict, cust: dict, k: Knobs, labels: list[dt.date], first_date: dt.date):
        self.cat, self.cust, self.k = cat, cust, k
        self.sets = _Sets.layout(cat)
        self.labels = labels
        self.first_date = first_date
        n = len(cust["ids"])
        self.ring = np.full((n, RING), -1, dtype=np.int32)
        self.n_bought = np.zeros(n, dtype=np.int64)  # lines bought so far (ring write pointer)

    def attract(self, rng, w: int, label: dt.date) -> tuple[np.ndarray, np.ndarray]:
        c = self.cat
        mid = label + dt.timedelta(days=3)
        season_cl = np.array([_season(mid, a, p) for a, p in CLUSTER_SEASON])
        t = w - c["launch"]
        life = np.where(t < 0, 0.0, np.where(t == 0, 0.6, np.exp(-np.maximum(t - 1, 0) / c["tau"])))
        noise = rng.lognormal(0.0, self.k.attract_noise_sigma, len(t))
        return c["base"] * life * season_cl[c["cluster"]] * noise, season_cl

    def weights(self, tables: _WeekTables, buyers: np.ndarray) -> np.ndarray:
        """(B, n_comp + 1) effective component weights for the week, repeat last; rows sum to 1."""
        cs = self.cust["comp_set"][buyers]
        w = self.cust["comp_w"][buyers] * np.where(cs >= 0, tables.set_mult[np.maximum(cs, 0)], 0.0)
        rep = self.cust["rep_w"][buyers] * (self.n_bought[buyers] > 0)
        out = np.concatenate([w, rep[:, None]], axis=1)
        return out / out.sum(axis=1, keepdims=True)

    def oracle(self, tables: _WeekTables, buyers: np.ndarray, weights: np.ndarray, chunk: int = 4000):
        """Exact top-100 of P(article | buyer, week): (B, 100) article ids and probabilities.

        Candidates are each component's top-100 by attractiveness plus the last
        8 purchases (see the module docstring for why that is exact).
        """
        sets = self.sets
        top = tables.top(sets, ORACLE_TOP)
        inv_z = np.where(tables.z > 0, 1.0 / np.where(tables.z > 0, tables.z, 1.0), 0.0)
        level = sets.level_of_article
        n_comp = self.cust["comp_set"].shape[1]
        # which level (0 global, 1 ig, 2 cell, 3 style) each component slot is
        slot_level = np.array([0, 1, 2] + [3] * (n_comp - 3))
        out_a = np.full((len(buyers), ORACLE_TOP), -1, dtype=np.int64)
        out_p = np.zeros((len(buyers), ORACLE_TOP))
        for lo in range(0, len(buyers), chunk):
            b = buyers[lo : lo + chunk]
            W = weights[lo : lo + chunk]
            cs = self.cust["comp_set"][b]
            ring = self.ring[b].astype(np.int64)
            cand = np.concatenate([top[np.maximum(cs, 0)].reshape(len(b), -1), ring], axis=1)
            cand = np.sort(cand, axis=1)
            valid = cand >= 0
            valid[:, 1:] &= cand[:, 1:] != cand[:, :-1]
            ca = np.maximum(cand, 0)
            att = tables.attract[ca]
            p = np.zeros(cand.shape)
            for j in range(n_comp):
                s = cs[:, j]
                m = level[slot_level[j]][ca] == s[:, None]
                p += m * (W[:, j] * inv_z[np.maximum(s, 0)])[:, None]
            p *= att
            n_fill = np.minimum(self.n_bought[b], RING)
            rep_share = (ring[:, None, :] == cand[:, :, None]).sum(axis=2) / np.maximum(n_fill, 1)[:, None]
            p += W[:, -1][:, None] * rep_share
            p = np.where(valid & (p > 0), p, -1.0)
            order = np.argsort(-p, axis=1, kind="stable")[:, :ORACLE_TOP]
            pa_ = np.take_along_axis(p, order, axis=1)
            aa = np.take_along_axis(cand, order, axis=1)
            out_a[lo : lo + chunk] = np.where(pa_ > 0, aa, -1)
            out_p[lo : lo + chunk] = np.where(pa_ > 0, pa_, 0.0)
        return out_a, out_p

    def dense_probs(self, res: dict) -> np.ndarray:
        """(B, n_articles) P(article | buyer, week) by brute force over every article, for an oracle week's result.

        The reference the oracle's candidate shortcut is tested against; only
        for tiny data (memory is B x n_articles). Uses the purchase memory as
        it was before the week (the week's own purchases come after).
        """
        tables, buyers, weights = res["tables"], res["buyers"], res["weights"]
        ring, n_bought = res["ring_before"], res["n_bought_before"]
        level = self.sets.level_of_article
        n_comp = self.cust["comp_set"].shape[1]
        slot_level = [0, 1, 2] + [3] * (n_comp - 3)
        inv_z = np.where(tables.z > 0, 1.0 / np.where(tables.z > 0, tables.z, 1.0), 0.0)
        out = np.zeros((len(buyers), len(tables.attract)))
        for j in range(n_comp):
            s = self.cust["comp_set"][buyers, j]
            member = level[slot_level[j]][None, :] == s[:, None]
            out += member * (weights[:, j] * inv_z[np.maximum(s, 0)])[:, None] * tables.attract[None, :]
        n_fill = np.minimum(n_bought, RING)
        for i in range(len(buyers)):
            for a in ring[i, : n_fill[i]]:
                out[i, a] += weights[i, -1] / n_fill[i]
        return out

    def week(self, rng, w: int, label: dt.date, want_oracle: bool):
        """Simulate H&M week ``w``; returns a dict of row arrays (+ oracle arrays if asked)."""
        cust, cat, k = self.cust, self.cat, self.k
        attract, season_cl = self.attract(rng, w, label)
        tables = _WeekTables.build(self.sets, attract, season_cl)
        n = len(cust["ids"])
        # -- who buys
        first = cust["first_week"]
        p_buy = -np.expm1(-cust["lam"] * _volume(label))
        u = rng.random(n)
        buyers = np.flatnonzero((first == w) | ((first < w) & (u < p_buy)))
        weights = self.weights(tables, buyers)
        res = {"buyers": buyers, "new": first[buyers] == w}
        if want_oracle:
            res["tables"], res["weights"] = tables, weights
            res["oracle_a"], res["oracle_p"] = self.oracle(tables, buyers, weights)
            res["ring_before"] = self.ring[buyers].copy()
            res["n_bought_before"] = self.n_bought[buyers].copy()
        # -- basket lines
        n_lines = 1 + rng.poisson(cust["mu"][buyers])
        L = int(n_lines.sum())
        line_b = np.repeat(np.arange(len(buyers)), n_lines)
        line_j = np.arange(L) - np.repeat(np.cumsum(n_lines) - n_lines, n_lines)
        cumw = np.cumsum(weights, axis=1)
        u_comp = rng.random(L)
        comp = np.minimum((cumw[line_b] <= u_comp[:, None]).sum(axis=1), weights.shape[1] - 1)
        u_art = rng.random(L)
        c_of_line = buyers[line_b]
        n_fill = np.minimum(self.n_bought[c_of_line], RING)
        # float rounding could land on a zero-weight repeat slot: never repeat without history
        is_rep = (comp == weights.shape[1] - 1) & (n_fill > 0)
        set_ids = cust["comp_set"][c_of_line, np.minimum(comp, weights.shape[1] - 2)]
        art = tables.sample(np.maximum(set_ids, 0), u_art)
        slot = np.minimum((u_art * n_fill).astype(np.int64), np.maximum(n_fill - 1, 0))
        art = np.where(is_rep, self.ring[c_of_line, slot], art)
        # -- day, channel, units
        dow = DOW_WEIGHTS.copy()
        if label < self.first_date:
            dow[: (self.first_date - label).days] = 0.0  # the real file starts on a Thursday
        dow /= dow.sum()
        day_b = rng.choice(7, size=len(buyers), p=dow)
        online_b = rng.random(len(buyers)) < cust["p_online"][buyers]
        other = rng.random(L) < k.other_day_share
        day_other = rng.choice(7, size=L, p=dow)
        online_other = rng.random(L) < cust["p_online"][c_of_line]
        day = np.where(other, day_other, day_b[line_b])
        online = np.where(other, online_other, online_b[line_b])
        units = 1 + rng.poisson(k.extra_units_rate, L)
        age_w = w - cat["launch"][art]
        stage = (age_w >= cat["markdown_at"][art]).astype(np.int64) + (age_w >= cat["markdown_at"][art] + 10)
        price = cat["price_idx"][art, stage]
        # -- remember purchases (after the week: the week's probabilities do not move within it)
        keep = line_j >= (n_lines[line_b] - RING)
        pos = (self.n_bought[c_of_line] + line_j) % RING
        self.ring[c_of_line[keep], pos[keep]] = art[keep]
        self.n_bought[buyers] += n_lines
        # -- rows: one per unit, sorted by day then customer
        order = np.lexsort((line_j, c_of_line, day))
        order = np.repeat(order, units[order])
        res.update(
            day=day[order].astype(np.int8),
            customer=c_of_line[order],
            article=art[order],
            price=price[order],
            channel=np.where(online[order], 2, 1).astype(np.int8),
            line_customer=c_of_line,
            line_article=art,
            launched=int(np.sum(cat["launch"] == w)),
        )
        return res


# ==========================================================================
# Output
# ==========================================================================
def _rows_table(res: dict, label: dt.date, cat: dict, cust: dict, price_arrow):
    import pyarrow as pa
    import pyarrow.compute as pc

    days = pa.array([(label + dt.timedelta(days=i)).isoformat() for i in range(7)], pa.string())
    return pa.table(
        {
            "t_dat": pc.take(days, pa.array(res["day"])),
            "customer_id": pc.take(cust["ids_arrow"], pa.array(res["customer"])),
            "article_id": pc.take(cat["ids_arrow"], pa.array(res["article"])),
            "price": pc.take(price_arrow, pa.array(res["price"])),
            "sales_channel_id": pa.array(res["channel"], pa.int8()),
        }
    )


def _write_oracle(path: Path, res: dict, cat: dict, cust: dict) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    a, p = res["oracle_a"], res["oracle_p"]
    ok = a >= 0
    rows_b = np.repeat(res["buyers"], ok.sum(axis=1))
    rank = np.broadcast_to(np.arange(1, ORACLE_TOP + 1, dtype=np.int16), a.shape)[ok]
    table = pa.table(
        {
            "customer_id": pc.take(cust["ids_arrow"], pa.array(rows_b)),
            "article_id": pc.take(cat["ids_arrow"], pa.array(a[ok])),
            "prob": pa.array(p[ok], pa.float64()),
            "rank": pa.array(rank, pa.int16()),
        }
    )
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


ORACLE_README = (
    "Generator-only truth, never part of the H&M files. top100_<week>.parquet: for each customer who bought "
    "in that H&M week (Wednesday label), the 100 articles with the highest true per-item purchase probability "
    "(the probabilities the purchases were sampled from); columns customer_id, article_id, prob, rank. "
    "future_transactions.csv: the simulated week after the data, H&M format. stats.json: data statistics.\n"
)


def oracle_weeks(oracle_dir: Path) -> list[dt.date]:
    """Week labels (Wednesdays) that have an oracle file under ``oracle_dir``, sorted; [] if none."""
    d = Path(oracle_dir)
    if not d.is_dir():
        return []
    out = []
    for f in d.glob(f"{_ORACLE_PREFIX}*.parquet"):
        try:
            out.append(dt.date.fromisoformat(f.stem.removeprefix(_ORACLE_PREFIX)))
        except ValueError:
            continue
    return sorted(out)


def oracle_path(oracle_dir: Path, week: dt.date) -> Path:
    return Path(oracle_dir) / f"{_ORACLE_PREFIX}{week.isoformat()}.parquet"


def load_oracle(oracle_dir: Path, week: dt.date):
    """Top-100 articles by TRUE purchase probability for each customer who bought in H&M week ``week``.

    ``week`` is any day of the week (normalised to its Wednesday label).
    Returns a DataFrame with columns customer_id (str), article_id (str, 10
    chars), prob (float64: probability that one item the customer bought that
    week is this article), rank (int16, 1-based), sorted by customer_id, rank;
    ``None`` if that week has no oracle.
    """
    import pandas as pd

    path = oracle_path(oracle_dir, schema.week_start(week))
    if not path.exists():
        return None
    df = pd.read_parquet(path)
    df["customer_id"] = df["customer_id"].astype("str")
    df["article_id"] = df["article_id"].astype("str")
    return df


# ==========================================================================
# Statistics
# ==========================================================================
# (key, label, real-data target shown next to it, accepted range at small scale)
STAT_ROWS = [
    ("weekly_buyer_share", "share of customers buying in a week (last 13 wk)", "~0.05", (0.035, 0.08)),
    ("rows_per_buyer", "rows per weekly buyer (last 13 wk)", "~3.5-4.5", (3.0, 4.8)),
    ("articles_per_buyer", "distinct articles per weekly buyer (last 13 wk)", "~3.5", (2.6, 4.2)),
    ("new_buyer_share", "share of a week's buyers who are new (last 13 wk)", "~0.08", (0.04, 0.20)),
    ("duplicate_row_share", "exact duplicate rows", "0.094", (0.075, 0.115)),
    ("online_share", "online rows (sales_channel_id 2)", "~0.70", (0.62, 0.78)),
    ("top1pct_article_share", "sales share of the top 1% of articles", "long tail", (0.08, 0.40)),
    ("new_article_share_per_week", "articles launched per week / catalogue", "0.005-0.01", (0.004, 0.012)),
    ("repeat_share", "lines re-buying an article bought in an earlier week (last 13 wk)", "a few %", (0.01, 0.12)),
    ("recall12_oracle", "Recall@12 oracle, holdout week", "ceiling", (0.05, 1.0)),
    ("recall12_popularity", "Recall@12 last-week popularity, holdout week", "", (0.0, 1.0)),
    ("recall12_repurchase_popularity", "Recall@12 last-8-purchases + popularity, holdout week", "", (0.0, 1.0)),
    ("oracle_over_popularity", "oracle / popularity Recall@12", "2-5x", (2.0, 8.0)),
]


class _Stats:
    """Streaming statistics: per-week counters, article sales, repeats on a customer sample."""

    def __init__(self, n_customers: int, n_articles: int, n_weeks: int, n_prices: int):
        self.n_customers, self.n_articles, self.n_weeks = n_customers, n_articles, n_weeks
        self.n_prices = n_prices
        self.buyers = np.zeros(n_weeks, np.int64)
        self.new = np.zeros(n_weeks, np.int64)
        self.rows = np.zeros(n_weeks, np.int64)
        self.lines_distinct = np.zeros(n_weeks, np.int64)
        self.dup = np.zeros(n_weeks, np.int64)
        self.online = np.zeros(n_weeks, np.int64)
        self.launched = np.zeros(n_weeks, np.int64)
        self.repeat_lines = np.zeros(n_weeks, np.int64)
        self.sample_lines = np.zeros(n_weeks, np.int64)
        self.sales = np.zeros(n_articles, np.int64)
        # repeats need every past (customer, article) pair: keep them for a sample of customers
        self.stride = max(1, n_customers // 100_000)
        self.history = np.zeros(0, np.int64)
        self.recall: dict[str, float] = {}

    def add_week(self, w: int, res: dict) -> None:
        if w >= self.n_weeks:
            return
        self.buyers[w] = len(res["buyers"])
        self.new[w] = int(res["new"].sum())
        self.rows[w] = len(res["customer"])
        self.online[w] = int((res["channel"] == 2).sum())
        self.launched[w] = res["launched"]
        # an exact duplicate = same day, customer, article, price and channel
        key = ((res["day"].astype(np.int64) * self.n_customers + res["customer"]) * self.n_articles + res["article"])
        key = (key * self.n_prices + res["price"]) * 2 + (res["channel"] - 1)
        self.dup[w] = len(key) - len(unique(key))
        pair = res["customer"].astype(np.int64) * self.n_articles + res["article"]
        upair = unique(pair)
        self.lines_distinct[w] = len(upair)
        self.sales += np.bincount(res["article"], minlength=self.n_articles)
        samp = upair[(upair // self.n_articles) % self.stride == 0]
        seen = np.isin(samp, self.history, assume_unique=True)
        self.repeat_lines[w] = int(seen.sum())
        self.sample_lines[w] = len(samp)
        # both parts are sorted: timsort merges the two runs in linear time
        self.history = np.sort(np.concatenate([self.history, samp[~seen]]), kind="stable")

    def recall_at_holdout(self, res: dict, pop_counts: np.ndarray) -> None:
        """Recall@12 of the oracle, last-week popularity and last-8 + popularity on this week's buyers."""
        k = 12
        pop = np.lexsort((np.arange(len(pop_counts)), -pop_counts))[:k]
        rel_pairs = unique(res["line_customer"].astype(np.int64) * self.n_articles + res["line_article"])
        rel_c = rel_pairs // self.n_articles
        rel_a = rel_pairs % self.n_articles
        buyers = res["buyers"]
        bpos = np.searchsorted(buyers, rel_c)
        n_rel = np.bincount(bpos, minlength=len(buyers))

        def recall(pred: np.ndarray) -> float:  # pred (B, k) article ids, -1 padded
            hit = np.zeros(len(rel_c), bool)
            for j in range(pred.shape[1]):
                hit |= pred[bpos, j] == rel_a
            return float(np.mean(np.bincount(bpos, weights=hit, minlength=len(buyers)) / n_rel))

        self.recall["recall12_oracle"] = recall(res["oracle_a"][:, :k])
        self.recall["recall12_popularity"] = recall(np.broadcast_to(pop, (len(buyers), k)))
        # repurchase: the buyer's last 8 purchases, most recent first, then popularity
        ring, nb = res["ring_before"], res["n_bought_before"]
        pred = np.full((len(buyers), k), -1, dtype=np.int64)
        for i in range(len(buyers)):
            seen: list[int] = []
            for j in range(min(nb[i], RING)):
                a = int(ring[i, (nb[i] - 1 - j) % RING])
                if a not in seen:
                    seen.append(a)
            for a in pop:
                if len(seen) >= k:
                    break
                if a not in seen:
                    seen.append(int(a))
            pred[i, : len(seen[:k])] = seen[:k]
        self.recall["recall12_repurchase_popularity"] = recall(pred)

    def summary(self) -> dict:
        last = slice(max(0, self.n_weeks - 13), self.n_weeks)
        b = self.buyers[last]
        total_rows = int(self.rows.sum())
        top = np.sort(self.sales)[::-1][: max(1, math.ceil(0.01 * self.n_articles))]
        out = {
            "weekly_buyer_share": float(np.mean(b / self.n_customers)),
            "rows_per_buyer": float(self.rows[last].sum() / max(1, b.sum())),
            "articles_per_buyer": float(self.lines_distinct[last].sum() / max(1, b.sum())),
            "new_buyer_share": float(np.mean(self.new[last] / np.maximum(b, 1))),
            "duplicate_row_share": float(self.dup.sum() / max(1, total_rows)),
            "online_share": float(self.online.sum() / max(1, total_rows)),
            "top1pct_article_share": float(top.sum() / max(1, self.sales.sum())),
            "new_article_share_per_week": float(self.launched[1:].mean() / self.n_articles) if self.n_weeks > 1 else 0.0,
            "repeat_share": float(self.repeat_lines[last].sum() / max(1, self.sample_lines[last].sum())),
            "articles_never_sold": float(np.mean(self.sales == 0)),
        }
        out.update(self.recall)
        if out.get("recall12_popularity"):
            out["oracle_over_popularity"] = out["recall12_oracle"] / out["recall12_popularity"]
        return out


def format_stats(stats: dict) -> str:
    """The statistics table printed after generation, next to the real-data targets."""
    lines = [f"{'statistic':<68} {'value':>9}  target (real data)"]
    for key, label, target, _ in STAT_ROWS:
        v = stats.get("shape", stats).get(key)
        if v is not None:
            lines.append(f"{label:<68} {v:>9.4f}  {target}")
    return "\n".join(lines)


# ==========================================================================
# generate()
# ==========================================================================
def generate(
    out: Path,
    scale: str = "small",
    seed: int = 42,
    progress: bool = True,
    drop_weeks: int = 0,
    knobs: Knobs | None = None,
) -> dict:
    """Write articles.csv, customers.csv, transactions_train.csv into `out`, and oracle/ under it.

    ``drop_weeks=N`` writes the last N weeks as ``out/drops/transactions_<YYYY-MM-DD>.csv``
    (Wednesday label, H&M format) instead of into transactions_train.csv; the
    oracle weeks stay the last two complete weeks of ALL simulated data and
    the hidden week after it. Returns the statistics dict (also written to
    out/oracle/stats.json). The same (scale, seed, drop_weeks) gives
    byte-identical files. ``knobs`` overrides the behavioural parameters
    (calibration only; the default is ``KNOBS``).
    """
    import pyarrow as pa
    from tqdm import tqdm

    from hm_recsys.data.hmcsv import TransactionsCsvWriter, fixed_width_strings, write_articles_csv, write_customers_csv

    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    sc = SCALES[scale]
    if not 0 <= drop_weeks <= sc.weeks - 3:
        raise ValueError(f"drop_weeks must be in 0..{sc.weeks - 3} at scale {scale!r} ({sc.weeks} weeks), got {drop_weeks}")
    t0 = time.perf_counter()
    out = Path(out)
    oracle_dir = out / "oracle"
    drops_dir = out / "drops"
    oracle_dir.mkdir(parents=True, exist_ok=True)
    # stale outputs of an earlier run with other options must not survive next to the new ones
    for f in [*oracle_dir.glob(f"{_ORACLE_PREFIX}*.parquet"), *drops_dir.glob("transactions_*.csv")]:
        f.unlink()

    k = knobs or KNOBS
    rng = np.random.default_rng(seed)
    labels, first_date, hidden = data_weeks(scale)
    n_weeks = sc.weeks
    art_df, cat = _build_catalog(rng, sc.articles, n_weeks, k)
    cat["ids_arrow"] = fixed_width_strings(cat["ids"])
    write_articles_csv(art_df, out / schema.FILES["articles"])
    del art_df
    cust_table, cust = _build_customers(rng, sc.customers, n_weeks, cat, k)
    write_customers_csv(cust_table, out / schema.FILES["customers"])
    del cust_table
    price_arrow = pa.array(cat["price_text"], pa.string())

    world = _World(cat, cust, k, labels, first_date)
    stats = _Stats(sc.customers, sc.articles, n_weeks, len(cat["price_text"]))
    oracle_idx = {n_weeks - 2, n_weeks - 1, n_weeks}
    all_labels = [*labels, hidden]
    first_drop = n_weeks - drop_weeks
    pop_counts = None
    rows_train = rows_drops = rows_future = 0
    bar = tqdm(total=n_weeks + 1, desc=f"generate {scale}", unit="wk", disable=not progress)
    with TransactionsCsvWriter(out / schema.FILES["transactions"]) as train:
        for w, label in enumerate(all_labels):
            res = world.week(rng, w, label, want_oracle=w in oracle_idx)
            table = _rows_table(res, label, cat, cust, price_arrow)
            if w == n_weeks:
                with TransactionsCsvWriter(oracle_dir / "future_transactions.csv") as fut:
                    fut.write(table)
                rows_future = table.num_rows
            elif w >= first_drop:
                with TransactionsCsvWriter(drops_dir / f"transactions_{label.isoformat()}.csv") as dw:
                    dw.write(table)
                rows_drops += table.num_rows
            else:
                train.write(table)
                rows_train += table.num_rows
            if w in oracle_idx:
                _write_oracle(oracle_path(oracle_dir, label), res, cat, cust)
            if w == n_weeks - 2:
                pop_counts = np.bincount(res["article"], minlength=sc.articles)
            if w == n_weeks - 1:
                stats.recall_at_holdout(res, pop_counts)
            stats.add_week(w, res)
            del res, table
            bar.update(1)
    bar.close()

    result = {
        "scale": scale,
        "seed": seed,
        "drop_weeks": drop_weeks,
        "customers": sc.customers,
        "articles": sc.articles,
        "weeks": n_weeks,
        "first_date": first_date.isoformat(),
        "last_date": (labels[-1] + dt.timedelta(days=6)).isoformat(),
        "last_train_date": (labels[first_drop - 1] + dt.timedelta(days=6)).isoformat(),
        "rows_train": rows_train,
        "rows_drops": rows_drops,
        "rows_total": rows_train + rows_drops,
        "rows_future": rows_future,
        "drop_files": [f"drops/transactions_{labels[w].isoformat()}.csv" for w in range(first_drop, n_weeks)],
        "oracle_weeks": {
            "valid": labels[-2].isoformat(),
            "holdout": labels[-1].isoformat(),
            "hidden": hidden.isoformat(),
        },
        "shape": stats.summary(),
        "knobs": dataclasses.asdict(k),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (oracle_dir / "stats.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (oracle_dir / "README.txt").write_text(ORACLE_README)
    return result


def _simulate(scale: str, seed: int, knobs: Knobs | None = None):
    """Yield ``(week index, label, week result, world)`` exactly as ``generate`` simulates them, writing nothing.

    For tests and analysis: the result of an oracle week also carries the
    week's sampling tables and the buyers' component weights.
    """
    from hm_recsys.data.hmcsv import fixed_width_strings

    sc, k = SCALES[scale], knobs or KNOBS
    rng = np.random.default_rng(seed)
    labels, first_date, hidden = data_weeks(scale)
    _, cat = _build_catalog(rng, sc.articles, sc.weeks, k)
    cat["ids_arrow"] = fixed_width_strings(cat["ids"])
    _, cust = _build_customers(rng, sc.customers, sc.weeks, cat, k)
    world = _World(cat, cust, k, labels, first_date)
    for w, label in enumerate([*labels, hidden]):
        yield w, label, world.week(rng, w, label, want_oracle=w >= sc.weeks - 2), world


# ==========================================================================
# CLI
# ==========================================================================
def main(argv: list[str] | None = None) -> int:
    """``hm-recsys generate``: write a synthetic H&M dataset (+ oracle) and print its statistics."""
    parser = argparse.ArgumentParser(
        prog="hm-recsys generate",
        description="Write a synthetic dataset in H&M's exact CSV format, plus oracle/ (true purchase probabilities).",
    )
    parser.add_argument("--scale", choices=list(SCALES), default="small", help="tiny (tests), small (demo), full (benchmark)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: $HM_RECSYS_HOME/data/raw)")
    parser.add_argument("--drop-weeks", type=int, default=0, help="write the last N weeks as drops/transactions_<week>.csv instead")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    out = args.out
    if out is None:
        from hm_recsys.config import Settings

        out = Settings.from_env().layout.raw_dir
    try:
        stats = generate(out, scale=args.scale, seed=args.seed, progress=not args.no_progress, drop_weeks=args.drop_weeks)
    except ValueError as e:
        print(f"hm-recsys generate: {e}", file=sys.stderr)
        return 2
    drops = f", the last {stats['drop_weeks']} weeks as drops/" if stats["drop_weeks"] else ""
    print(
        f"wrote {out}: {stats['customers']:,} customers, {stats['articles']:,} articles, "
        f"{stats['rows_total']:,} transaction rows ({stats['first_date']}..{stats['last_date']}{drops}) "
        f"in {stats['seconds']:.1f} s"
    )
    print(format_stats(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
