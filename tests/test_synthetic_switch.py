"""data.genre_in_text=false: the same interactions, but no genre word anywhere in the text."""
import numpy as np

from ckf_dist.config import load_config
from ckf_dist.data.synthetic import GENRES, generate


def test_without_genre_words_the_draws_match_and_the_text_says_nothing():
    base = ["data.num_users=120", "data.num_items=80"]
    with_genre, truth = generate(load_config(base).data)
    without, truth2 = generate(load_config(base + ["data.genre_in_text=false"]).data)
    for col in ("raw_user_id", "raw_item_id", "rating", "timestamp"):
        assert with_genre.interactions.column(col).equals(without.interactions.column(col)), col
    assert np.array_equal(truth["item_cluster"], truth2["item_cluster"])
    genre_words = {g for g, words, adj in GENRES} | {w for g, words, adj in GENRES for w in words} | {
        adj for g, words, adj in GENRES}
    titles = without.items.column("title").to_pylist()
    reviews = set(without.interactions.column("review").to_pylist())
    assert not any(set(t.split()) & genre_words for t in titles), titles[:5]
    assert not any(set(r.split()) & genre_words for r in reviews), reviews
    assert len(set(titles)) == len(titles)  # still unique
    assert any(set(t.split()) & genre_words for t in with_genre.items.column("title").to_pylist())
