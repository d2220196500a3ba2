"""Prompt rows (``schema.PROMPTS_SCHEMA``) for the four CKF tasks and the review -> rating variant, in text-only
and hybrid form.

For each split, the targets are that split's interactions; a prompt's history is the user's interactions
strictly before the target in time (``Canonical.hist_start/hist_end``), never the full log. Hybrid prompts put
one placeholder after "The user" and one after each target/candidate title, in order; history titles get none.
The text-only form is the hybrid one with the placeholders removed (titles are cleaned of literal
placeholders beforehand, so this is exact).

==============  ====================================================================================  =========
task            hybrid prompt (``<cf>`` = soft token)                                                  answer
==============  ====================================================================================  =========
ctr             The user <cf> interacted with: h1; h2. Will the user enjoy t <cf>? Answer Yes or No.   Yes / No
topk            The user <cf> interacted with: h1; h2. Candidates: c1 <cf>; c2 <cf>; ... Which will    title
                the user choose next?
rating          The user <cf> rated: h1: 4; h2: 5. How will the user rate t <cf>? Answer 1 to 5.        "4"
explanation     The user <cf> interacted with: h1; h2. Explain what the user thinks of t <cf>.          sentence
review_rating   The user <cf> wrote about t <cf>: 'sentence'. What rating did the user give? Answer    "4"
                1 to 5.
next_item       The user <cf> interacted with: h1; h2. Which item will the user choose next?          title
==============  ====================================================================================  =========

next_item (opt-in) is top-K for the item-prediction head (``CKFModel.item_embeddings``): no candidates in the
prompt, no target items, label = the true item's id; the head scores every item at the answer position.

"sentence" is one sentence of the user's review of the target (``raw.review_sentence``: the first with at least
``data.review_min_words`` words, cut to ``data.review_max_words``). review_rating rows carry the history ids
(for the user's soft token) but list no history titles: the review is the evidence. Tasks whose data a
source lacks are skipped with the reason in the manifest (rating, review_rating: no ratings; explanation,
review_rating: no reviews).

A user without history reads "The user <cf> is new." Labels: ctr 1/0 (rating > 3; every interaction of an
implicit-feedback source is positive), plus sampled never-interacted items as label-0 rows until the classes
balance; topk: index of the positive among ``data.num_candidates`` shuffled candidates (the rest are sampled
never-interacted items); rating, review_rating: the rating (written in answers and "rated:" histories as its
exact shortest decimal, "4" or "3.5", never truncated); explanation: -1. Rows of a split are written in a seeded
random order so that a streaming reader's local shuffle buffer sees all tasks mixed. Everything is deterministic for
a given ``data.seed`` (each (split, task) has its own generator, so dropping a task changes no other task).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ckf_dist.config import DataConfig
from ckf_dist.data.canonical import SPLIT_CODES, Canonical, range_lists
from ckf_dist.data.raw import review_sentences
from ckf_dist.data.schema import PLACEHOLDER, PROMPTS_SCHEMA, SPLITS, TASK_IDS, expected_placeholders

P = " " + PLACEHOLDER  # the placeholder as it follows the user / a title
MAX_RESAMPLE_ROUNDS = 64


@dataclass
class PromptSet:
    """Prompt tables per split plus the facts the manifest reports."""

    tables: dict[str, pa.Table]
    counts: dict[str, dict[str, int]]  # split -> task -> rows
    skipped_tasks: dict[str, str] = field(default_factory=dict)  # task -> reason
    ctr_positive_fraction: dict[str, float] = field(default_factory=dict)
    max_prompt_chars: int = 0


class NegativeSampler:
    """Samples items a user never interacted with (in any split), distinct within a row; vectorised with
    rejection, with an exact per-row fallback for users who interacted with most of the catalogue."""

    def __init__(self, data: Canonical):
        self.num_items = data.num_items
        self.keys = np.unique(data.user * data.num_items + data.item)  # sorted (user, item) keys
        seen_per_user = np.bincount(self.keys // data.num_items, minlength=data.num_users)
        self.available = data.num_items - seen_per_user
        self.raw_user_ids = data.raw_user_ids

    def _seen(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        key = users[:, None] * self.num_items + items
        pos = np.minimum(np.searchsorted(self.keys, key), self.keys.size - 1)
        return self.keys[pos] == key

    @staticmethod
    def _has_duplicates(items: np.ndarray) -> np.ndarray:
        s = np.sort(items, axis=1)
        return (s[:, 1:] == s[:, :-1]).any(axis=1)

    def sample(self, rng: np.random.Generator, users: np.ndarray, k: int) -> np.ndarray:
        """[len(users), k] never-interacted items, distinct per row."""
        short = self.available[users] < k
        if short.any():
            u = int(users[np.argmax(short)])
            raise ValueError(f"user {self.raw_user_ids[u]!r} interacted with {self.num_items - self.available[u]} of "
                             f"{self.num_items} items: fewer than the {k} never-interacted negatives needed "
                             "(lower data.num_candidates)")
        out = rng.integers(0, self.num_items, (users.size, k))
        todo = np.flatnonzero(self._seen(users, out).any(axis=1) | self._has_duplicates(out))
        for _ in range(MAX_RESAMPLE_ROUNDS):
            if not todo.size:
                return out
            out[todo] = rng.integers(0, self.num_items, (todo.size, k))
            sub = out[todo]
            todo = todo[self._seen(users[todo], sub).any(axis=1) | self._has_duplicates(sub)]
        for row in todo:  # dense users: draw from the exact complement
            seen = self.keys[(self.keys // self.num_items) == users[row]] % self.num_items
            out[row] = rng.choice(np.setdiff1d(np.arange(self.num_items), seen), size=k, replace=False)
        return out


def rating_text(ratings: np.ndarray) -> pa.Array:
    """Each rating as its exact shortest decimal text: 4 -> "4", 3.5 -> "3.5", 4.2 (float32) -> "4.2"; NaN
    (no rating) -> "". Formatted once per distinct value."""
    values = np.asarray(ratings, dtype=np.float32)
    if values.size == 0:
        return pa.array([], pa.string())
    uniq, inverse = np.unique(values, return_inverse=True)
    text = np.array(["" if np.isnan(u) else np.format_float_positional(u, trim="-") for u in uniq], dtype=object)
    return pa.array(text[inverse.reshape(-1)], pa.string())


def _concat(*parts) -> pa.Array:
    """Element-wise string concatenation of arrays and (broadcast) str scalars, in Arrow."""
    return pc.binary_join_element_wise(*parts, "")


class _Renderer:
    """Per-interaction history clauses ("The user <cf> interacted with: h1; h2."), built once with Arrow string
    kernels and shared by every task and split."""

    def __init__(self, data: Canonical):
        self.titles = pa.array(data.titles, pa.string())
        self.history = data.history_lists()  # [N] item ids
        if data.history_override is None:  # the log rows themselves: their own ratings
            rows = range_lists(np.arange(data.num_interactions), data.hist_start, data.hist_end).values
            ratings = data.rating[rows.to_numpy()]
        else:
            ratings = _logged_ratings(data, self.history)
        self.intro, self.rated_intro = self.intros(self.history, ratings)

    def intros(self, history: pa.ListArray, ratings: np.ndarray | None = None) -> tuple[pa.Array, pa.Array]:
        """("interacted with" clause, "rated" clause) per row of ``history`` (item ids, oldest first);
        ``ratings`` [number of history values] (NaN = none; None = no ratings) give the "rated" form."""
        titles = self.titles.take(history.values)
        rated = titles
        if ratings is not None:
            rated = pc.if_else(pa.array(~np.isnan(ratings)), _concat(titles, ": ", rating_text(ratings)), titles)
        is_new = pc.equal(pc.list_value_length(history), 0)
        return (self._intro(history.offsets, titles, is_new, "interacted with"),
                self._intro(history.offsets, rated, is_new, "rated"))

    @staticmethod
    def _intro(offsets: pa.Array, values: pa.Array, is_new: pa.Array, verb: str) -> pa.Array:
        history = pc.binary_join(pa.ListArray.from_arrays(offsets, values), "; ")
        return pc.if_else(is_new, f"The user{P} is new.", _concat(f"The user{P} {verb}: ", history, "."))

    def title(self, items: np.ndarray) -> pa.Array:
        return self.titles.take(pa.array(items))


def _logged_ratings(data: Canonical, history: pa.ListArray) -> np.ndarray:
    """[number of history values] the user's (latest) logged rating of each listed item, NaN where none."""
    users = data.user[pc.list_parent_indices(history).to_numpy()]
    key = users * data.num_items + history.values.to_numpy()
    logged = data.user * data.num_items + data.item
    order = np.argsort(logged, kind="stable")  # rows are in time order: the last of equal keys is the latest
    keys = logged[order]
    pos = np.searchsorted(keys, key, side="right") - 1
    found = (pos >= 0) & (keys[np.maximum(pos, 0)] == key)
    return np.where(found, data.rating[order[np.maximum(pos, 0)]], np.nan).astype(np.float32)


def _task_table(split: str, task: str, users: np.ndarray, is_cold: np.ndarray, history: pa.ListArray,
                targets: np.ndarray, labels: np.ndarray, hybrid: pa.Array, answers: pa.Array) -> pa.Table:
    n, k = targets.shape
    target_lists = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * k),
                                            pa.array(targets.reshape(-1).astype(np.int64)))
    return pa.table({
        "sample_id": _concat(f"{split}-{task}-", pc.cast(pa.array(np.arange(n, dtype=np.int64)), pa.string())),
        "task": pa.array(np.full(n, task, dtype=object), pa.string()),
        "task_id": pa.array(np.full(n, TASK_IDS[task], dtype=np.int8)),
        "split": pa.array(np.full(n, split, dtype=object), pa.string()),
        "user_id": pa.array(users.astype(np.int64)),
        "is_cold": pa.array(np.asarray(is_cold, dtype=bool)),
        "history_item_ids": history,
        "target_item_ids": target_lists,
        "label": pa.array(labels.astype(np.float32)),
        "prompt_text": pc.replace_substring(hybrid, P, ""),
        "prompt_hybrid": hybrid,
        "answer": answers,
    }, schema=PROMPTS_SCHEMA)


def _rows_table(data: Canonical, r: _Renderer, split: str, task: str, anchors: np.ndarray, targets: np.ndarray,
                labels: np.ndarray, hybrid: pa.Array, answers: pa.Array) -> pa.Table:
    """A task table whose rows are interaction rows ``anchors`` (their user, cold flag and history)."""
    return _task_table(split, task, data.user[anchors], data.row_is_cold(anchors), r.history.take(pa.array(anchors)),
                       targets, labels, hybrid, answers)


def _ctr(data, r, sampler, rng, rows, split):
    rating = data.rating[rows]
    pos = np.isnan(rating) | (rating > 3)
    extra = max(0, int(pos.sum()) - int((~pos).sum()))
    extra_anchors = np.sort(rng.choice(rows, size=extra, replace=False)) if extra else rows[:0]
    neg_items = sampler.sample(rng, data.user[extra_anchors], 1)[:, 0] if extra else rows[:0]
    anchors = np.concatenate([rows, extra_anchors])
    items = np.concatenate([data.item[rows], neg_items])
    labels = np.concatenate([pos, np.zeros(extra, dtype=bool)])
    hybrid = _concat(r.intro.take(pa.array(anchors)), " Will the user enjoy ", r.title(items),
                     f"{P}? Answer Yes or No.")
    answers = pc.if_else(pa.array(labels), "Yes", "No")
    return _rows_table(data, r, split, "ctr", anchors, items[:, None], labels, hybrid, answers)


def _ctr_given(data, r, rows, split):
    """data.ctr_labels=given: the split's interactions (label 1) and its given label-0 rows, nothing sampled."""
    neg = data.negatives
    picked = np.flatnonzero(neg.split == SPLIT_CODES[split])
    neg_history = neg.history.take(pa.array(picked))
    neg_intro, _ = r.intros(neg_history)
    items = np.concatenate([data.item[rows], neg.item[picked]])
    labels = np.concatenate([np.ones(rows.size, dtype=bool), np.zeros(picked.size, dtype=bool)])
    intro = pa.concat_arrays([r.intro.take(pa.array(rows)), neg_intro])
    hybrid = _concat(intro, " Will the user enjoy ", r.title(items), f"{P}? Answer Yes or No.")
    return _task_table(split, "ctr", np.concatenate([data.user[rows], neg.user[picked]]),
                       np.concatenate([data.row_is_cold(rows), neg.is_cold[picked]]),
                       pa.concat_arrays([r.history.take(pa.array(rows)), neg_history]), items[:, None], labels,
                       hybrid, pc.if_else(pa.array(labels), "Yes", "No"))


def _topk(data, r, sampler, rng, rows, split, k):
    has = np.zeros(rows.size, dtype=bool)  # rows with a given candidate list (readers checked: k distinct, item once)
    if data.candidates is not None:
        given = data.candidates.take(pa.array(rows))
        has = pc.is_valid(given).to_numpy(zero_copy_only=False)
    negs = sampler.sample(rng, data.user[rows[~has]], k - 1)
    pos_idx = rng.integers(0, k, int((~has).sum()))
    cands = np.empty((rows.size, k), dtype=np.int64)
    sampled = np.empty((pos_idx.size, k), dtype=np.int64)
    is_pos = np.arange(k)[None, :] == pos_idx[:, None]
    sampled[is_pos] = data.item[rows[~has]]
    sampled[~is_pos] = negs.reshape(-1)
    cands[~has] = sampled
    labels = np.empty(rows.size, dtype=np.int64)
    labels[~has] = pos_idx
    if has.any():
        cands[has] = given.filter(pa.array(has)).values.to_numpy().reshape(-1, k)
        labels[has] = np.argmax(cands[has] == data.item[rows[has]][:, None], axis=1)
    listed = pc.binary_join_element_wise(*[_concat(r.title(cands[:, j]), P) for j in range(k)], "; ")
    hybrid = _concat(r.intro.take(pa.array(rows)), " Candidates: ", listed, ". Which will the user choose next?")
    return _rows_table(data, r, split, "topk", rows, cands, labels, hybrid, r.title(data.item[rows]))


def _rating(data, r, rows, split):
    rows = rows[~np.isnan(data.rating[rows])]
    items = data.item[rows]
    hybrid = _concat(r.rated_intro.take(pa.array(rows)), " How will the user rate ", r.title(items),
                     f"{P}? Answer 1 to 5.")
    answers = rating_text(data.rating[rows])
    return _rows_table(data, r, split, "rating", rows, items[:, None], data.rating[rows], hybrid, answers)


NEXT_ITEM_QUESTION = " Which item will the user choose next?"
MAX_EXACT_FLOAT32_ID = 2 ** 24  # labels are float32: item ids up to 2^24 are exact


def _next_item(data, r, rows, split):
    """Candidate-free top-K rows for the item-prediction head: the history, then the question; label = the
    true item's id, answer = its title (the head scores the whole catalogue at the answer position)."""
    if data.num_items > MAX_EXACT_FLOAT32_ID:
        raise ValueError(f"task next_item: {data.num_items} items; its float32 label holds item ids exactly only up "
                         f"to {MAX_EXACT_FLOAT32_ID}")
    items = data.item[rows]
    hybrid = _concat(r.intro.take(pa.array(rows)), NEXT_ITEM_QUESTION)
    return _rows_table(data, r, split, "next_item", rows, np.empty((rows.size, 0), dtype=np.int64),
                       items.astype(np.float32), hybrid, r.title(items))


def _with_review(data, rows, cfg):
    """(rows that have a review, their review sentences)."""
    rows = rows[pc.is_valid(data.review.take(pa.array(rows))).to_numpy(zero_copy_only=False)]
    return rows, review_sentences(data.review.take(pa.array(rows)), cfg.review_min_words, cfg.review_max_words)


def _explanation(data, r, rows, split, cfg):
    rows, sentences = _with_review(data, rows, cfg)
    items = data.item[rows]
    hybrid = _concat(r.intro.take(pa.array(rows)), " Explain what the user thinks of ", r.title(items), f"{P}.")
    return _rows_table(data, r, split, "explanation", rows, items[:, None], np.full(rows.size, -1.0), hybrid,
                       sentences)


def _review_rating(data, r, rows, split, cfg):
    rows, sentences = _with_review(data, rows[~np.isnan(data.rating[rows])], cfg)
    items = data.item[rows]
    hybrid = _concat(f"The user{P} wrote about ", r.title(items), f"{P}: '", sentences,
                     "'. What rating did the user give? Answer 1 to 5.")
    answers = rating_text(data.rating[rows])
    return _rows_table(data, r, split, "review_rating", rows, items[:, None], data.rating[rows], hybrid, answers)


def check_placeholders(table: pa.Table) -> None:
    """Every hybrid prompt has expected_placeholders(len(targets)) placeholders and the text form none;
    raises ValueError naming the first offending sample_id."""
    if table.num_rows == 0:
        return
    found = pc.count_substring(table.column("prompt_hybrid"), PLACEHOLDER).to_numpy()
    want = expected_placeholders(pc.list_value_length(table.column("target_item_ids")).to_numpy())
    in_text = pc.count_substring(table.column("prompt_text"), PLACEHOLDER).to_numpy()
    bad = np.flatnonzero((found != want) | (in_text != 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"sample {table.column('sample_id')[i].as_py()!r}: hybrid prompt has {found[i]} placeholders, "
                         f"expected {want[i]}; text prompt has {in_text[i]} (expected 0); {bad.size} rows affected")


def build_prompts(data: Canonical, cfg: DataConfig, has_ratings: bool, has_reviews: bool, source: str,
                  progress: Callable[[str], None] | None = None) -> PromptSet:
    """Builds, checks and shuffles the prompt rows of every split for ``cfg.tasks``."""
    skipped: dict[str, str] = {}
    if "rating" in cfg.tasks and not has_ratings:
        skipped["rating"] = f"source {source!r} has no ratings (implicit feedback)"
    if "explanation" in cfg.tasks and not has_reviews:
        skipped["explanation"] = f"source {source!r} has no review text to explain"
    if "review_rating" in cfg.tasks and not (has_ratings and has_reviews):
        missing = " and ".join(w for w, ok in (("ratings", has_ratings), ("review text", has_reviews)) if not ok)
        skipped["review_rating"] = f"source {source!r} has no {missing}"
    for task, reason in skipped.items():
        if progress:
            progress(f"[prepare] task {task!r} skipped: {reason}")
    tasks = [t for t in cfg.tasks if t not in skipped]
    unknown = [t for t in tasks if t not in TASK_IDS]
    if unknown:
        raise ValueError(f"data.tasks: unknown task {unknown[0]!r}; known: {sorted(TASK_IDS)}")
    sampler, renderer = NegativeSampler(data), _Renderer(data)
    out = PromptSet(tables={}, counts={}, skipped_tasks=skipped)
    for split in SPLITS:
        code = SPLIT_CODES[split]
        rows = np.flatnonzero(data.split == code)
        parts = []
        for task in tasks:
            rng = np.random.default_rng([cfg.seed, code, TASK_IDS[task]])
            if task == "ctr":
                table = (_ctr(data, renderer, sampler, rng, rows, split) if data.negatives is None
                         else _ctr_given(data, renderer, rows, split))
                labels = table.column("label").to_numpy()
                out.ctr_positive_fraction[split] = float(labels.mean()) if labels.size else 0.0
            elif task == "topk":
                table = _topk(data, renderer, sampler, rng, rows, split, cfg.num_candidates)
            elif task == "rating":
                table = _rating(data, renderer, rows, split)
            elif task == "explanation":
                table = _explanation(data, renderer, rows, split, cfg)
            elif task == "next_item":
                table = _next_item(data, renderer, rows, split)
            else:  # review_rating (TASK_IDS has exactly these six tasks)
                table = _review_rating(data, renderer, rows, split, cfg)
            parts.append(table)
        table = pa.concat_tables(parts) if parts else PROMPTS_SCHEMA.empty_table()
        check_placeholders(table)
        perm = np.random.default_rng([cfg.seed, code, 99]).permutation(table.num_rows)
        out.tables[split] = table.take(pa.array(perm))
        out.counts[split] = {name: t.num_rows for t, name in zip(parts, tasks)}
        if table.num_rows:
            out.max_prompt_chars = max(out.max_prompt_chars, int(pc.max(pc.utf8_length(table.column("prompt_hybrid"))).as_py()))
    return out
