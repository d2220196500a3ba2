"""A synthetic interaction log with planted latent structure that both the CF model and the LLM can learn.

The generative story (all draws from ``numpy.random.default_rng(data.seed)``, so a seed fixes everything):

* items are split evenly across ``data.num_clusters`` genres; a title is ``"<word> <genre> <n>"``
  (e.g. ``"shadow noir 17"``): short, unique (``n`` is the item number) and the genre word carries signal;
  every item has a small quality bias ~ N(0, 0.4);
* each user has a preferred genre (weight w ~ U(0.6, 0.9)) and a secondary genre (weight 1 - w);
  affinity(u, i) = 3 * weight_u(genre(i)) + bias(i) + N(0, 0.3);
* which items a user interacts with: sampled without replacement with probability ~ exp(affinity)
  (Gumbel top-k), so most, not all, interactions are in the preferred genre;
* rating = clip(round(1.5 + 1.2 * affinity + N(0, 0.5)), 1, 5): high in the preferred genre, low elsewhere;
* interactions per user: ``data.interactions_per_user``, except about 10% of users (cold start) with 4 or 5;
  timestamps strictly increase per user (random gaps of 10 minutes to 3 days);
* review text (for the explanation task) is templated from the genre and the rating,
  e.g. ``"a gripping noir the user loved"``.

With ``data.genre_in_text=false`` every random draw is the same, but titles take a genre-neutral word
(``"green 17"``: the word is drawn from a pool shared by all genres) and reviews only the feeling
(``"the user loved it"``): the text then says nothing about a user's taste or an item's genre, and only
the CF embeddings (which see who interacted with what) can.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ckf_dist.config import DataConfig
from ckf_dist.data.raw import RAW_INTERACTIONS_SCHEMA, RAW_ITEMS_SCHEMA, BadRows, RawData

# genre word, title words, adjective used in reviews
GENRES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("noir", ("dark", "shadow", "rain", "smoke", "neon"), "gripping"),
    ("comedy", ("silly", "happy", "crazy", "lucky", "goofy"), "funny"),
    ("space", ("star", "comet", "orbit", "nova", "rocket"), "epic"),
    ("romance", ("heart", "kiss", "rose", "summer", "love"), "tender"),
    ("horror", ("ghost", "blood", "night", "grave", "witch"), "creepy"),
    ("western", ("dust", "gun", "ranch", "canyon", "sheriff"), "rugged"),
    ("fantasy", ("dragon", "crown", "magic", "elf", "sword"), "magical"),
    ("war", ("battle", "front", "siege", "medal", "trench"), "brutal"),
)
# genre_in_text=false: a title word shared by all genres (indexed like the genre words, so the draws match)
NEUTRAL_WORDS = ("red", "old", "green", "last", "blue")
FEELINGS = {1: "hated", 2: "disliked", 3: "found okay", 4: "liked", 5: "loved"}
COLD_FRACTION = 0.1
COLD_SIZES = (4, 5)
BASE_TIME = 1_500_000_000
USER_CHUNK = 2048  # users scored at once (bounds the [users, items] affinity matrix)


def genre_name(cluster: int) -> str:
    """Genre word of a cluster; beyond the 8 built-in genres a numeric suffix keeps names distinct."""
    base, _, _ = GENRES[cluster % len(GENRES)]
    return base if cluster < len(GENRES) else f"{base}{cluster // len(GENRES) + 1}"


def review_text(cluster: int, rating: int, genre_in_text: bool = True) -> str:
    if not genre_in_text:
        return f"the user {FEELINGS[int(rating)]} it"
    return f"a {GENRES[cluster % len(GENRES)][2]} {genre_name(cluster)} the user {FEELINGS[int(rating)]}"


def title_text(cluster: int, word: int, number: int, genre_in_text: bool = True) -> str:
    """``"<genre word> <genre> <n>"``, or ``"<neutral word> <n>"`` without genre words in the text."""
    if not genre_in_text:
        return f"{NEUTRAL_WORDS[word % len(NEUTRAL_WORDS)]} {number}"
    return f"{GENRES[cluster % len(GENRES)][1][word]} {genre_name(cluster)} {number}"


def _check(cfg: DataConfig) -> None:
    if cfg.num_users < 1 or cfg.num_items < 2 or cfg.num_clusters < 1:
        raise ValueError("data.num_users, data.num_items, data.num_clusters must be >= 1, >= 2, >= 1 "
                         f"(got {cfg.num_users}, {cfg.num_items}, {cfg.num_clusters})")
    if cfg.num_clusters > cfg.num_items:
        raise ValueError(f"data.num_clusters={cfg.num_clusters} exceeds data.num_items={cfg.num_items}")
    if cfg.interactions_per_user < 1:
        raise ValueError(f"data.interactions_per_user={cfg.interactions_per_user} must be >= 1")
    # every user needs num_candidates - 1 never-interacted items for the top-K negatives
    if cfg.interactions_per_user + cfg.num_candidates - 1 > cfg.num_items:
        raise ValueError(f"data.num_items={cfg.num_items} is too small: each user needs "
                         f"data.interactions_per_user={cfg.interactions_per_user} items plus "
                         f"data.num_candidates-1={cfg.num_candidates - 1} never-interacted negatives")


def generate(cfg: DataConfig) -> tuple[RawData, dict]:
    """Returns the raw data and the planted truth (``item_cluster``, ``user_cluster``, ``user_second``)."""
    _check(cfg)
    rng = np.random.default_rng(cfg.seed)
    n_users, n_items, k = cfg.num_users, cfg.num_items, cfg.num_clusters

    item_cluster = rng.permutation(np.arange(n_items) % k)
    item_bias = rng.normal(0.0, 0.4, n_items)
    word_idx = rng.integers(0, len(GENRES[0][1]), n_items)
    titles = [title_text(c, w, i + 1, cfg.genre_in_text) for i, (c, w) in enumerate(zip(item_cluster.tolist(),
                                                                                       word_idx.tolist()))]

    user_cluster = rng.integers(0, k, n_users)
    user_second = (user_cluster + rng.integers(1, k, n_users)) % k if k > 1 else user_cluster.copy()
    w_main = rng.uniform(0.6, 0.9, n_users)
    cold = rng.random(n_users) < COLD_FRACTION
    n_per_user = np.where(cold, rng.integers(COLD_SIZES[0], COLD_SIZES[1] + 1, n_users), cfg.interactions_per_user)
    n_per_user = np.minimum(n_per_user, cfg.interactions_per_user)
    start_time = BASE_TIME + rng.integers(0, 365 * 86400, n_users)

    users, items, ratings = [], [], []
    for lo in range(0, n_users, USER_CHUNK):
        hi = min(lo + USER_CHUNK, n_users)
        u = np.arange(lo, hi)
        weight = np.zeros((hi - lo, k))
        weight[np.arange(hi - lo), user_second[u]] += 1.0 - w_main[u]
        weight[np.arange(hi - lo), user_cluster[u]] += w_main[u]
        affinity = 3.0 * weight[:, item_cluster] + item_bias[None, :] + rng.normal(0.0, 0.3, (hi - lo, n_items))
        # Gumbel top-k = sampling without replacement with probability ~ exp(affinity)
        keys = affinity + rng.gumbel(size=affinity.shape)
        top = np.argsort(-keys, axis=1)[:, : cfg.interactions_per_user]
        # random time order among each user's chosen items; slots beyond the user's count sort last
        n_u = n_per_user[u]
        slot_keys = rng.random(top.shape)
        slot_keys[np.arange(top.shape[1])[None, :] >= n_u[:, None]] = np.inf
        top = np.take_along_axis(top, np.argsort(slot_keys, axis=1), axis=1)
        keep = np.arange(top.shape[1])[None, :] < n_u[:, None]
        row_idx = np.broadcast_to(np.arange(hi - lo)[:, None], top.shape)[keep]
        chosen = top[keep]
        aff = affinity[row_idx, chosen]
        users.append(u[row_idx])
        items.append(chosen)
        ratings.append(np.clip(np.rint(1.5 + 1.2 * aff + rng.normal(0.0, 0.5, aff.shape)), 1, 5))
    user = np.concatenate(users)
    item = np.concatenate(items)
    rating = np.concatenate(ratings).astype(np.int64)

    # strictly increasing timestamps per user: rows are grouped by user in time order already
    gaps = rng.integers(600, 3 * 86400, user.size)
    csum = np.cumsum(gaps)
    first = np.r_[0, np.flatnonzero(np.diff(user)) + 1]
    before_user = np.repeat(np.r_[0, csum[first[1:] - 1]], np.diff(np.r_[first, user.size]))
    timestamp = start_time[user] + (csum - before_user)

    reviews_by_key = {(c, r): review_text(c, r, cfg.genre_in_text) for c in range(k) for r in FEELINGS}
    reviews = [reviews_by_key[(c, r)] for c, r in zip(item_cluster[item].tolist(), rating.tolist())]
    interactions = pa.table({
        "raw_user_id": pa.array([f"u{x:06d}" for x in user.tolist()], pa.string()),
        "raw_item_id": pa.array([f"i{x:06d}" for x in item.tolist()], pa.string()),
        "rating": pa.array(rating.astype(np.float32), pa.float32()),
        "timestamp": pa.array(timestamp.astype(np.int64), pa.int64()),
        "review": pa.array(reviews, pa.string()),
    }, schema=RAW_INTERACTIONS_SCHEMA)
    items_table = pa.table({
        "raw_item_id": pa.array([f"i{x:06d}" for x in range(n_items)], pa.string()),
        "title": pa.array(titles, pa.string()),
    }, schema=RAW_ITEMS_SCHEMA)
    truth = {"item_cluster": item_cluster, "user_cluster": user_cluster, "user_second": user_second,
             "genres": [genre_name(c) for c in range(k)]}
    return RawData(source="synthetic", interactions=interactions, items=items_table, bad_rows=BadRows(),
                   files=[], extras={"generator": "ckf_dist.data.synthetic", "seed": cfg.seed}), truth


def read(cfg: DataConfig) -> RawData:
    """The ``synthetic`` source reader (see :data:`ckf_dist.data.raw.SOURCES`)."""
    return generate(cfg)[0]
