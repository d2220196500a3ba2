"""The on-disk layout and parquet schemas of a prepared data set (local folder or ``s3://bucket/prefix``).

    <root>/_manifest.json                 written last: a data set without it is incomplete
    <root>/users/part-00000.parquet       USERS_SCHEMA
    <root>/items/part-00000.parquet       ITEMS_SCHEMA
    <root>/interactions/part-NNNNN.parquet  INTERACTIONS_SCHEMA
    <root>/prompts/{train,valid,test}/part-NNNNN.parquet  PROMPTS_SCHEMA

Ids are contiguous int64 indices (0..n-1) assigned at preparation; the source's own ids are kept as
strings in ``raw_user_id`` / ``raw_item_id``. Prompts carry their own history (the items before the target
in time), never the user's full log, so nothing of the target leaks into the soft tokens.
"""
from __future__ import annotations

import pyarrow as pa

PLACEHOLDER = "<cf>"  # a dedicated added special token; the model swaps its embeddings for soft tokens
MANIFEST = "_manifest.json"
SPLITS = ("train", "valid", "test")
# review_rating: the review -> rating variant; next_item: top-K by the item-prediction head (candidate-free
# prompts; CLLM4Rec). Both opt-in, not in the default data.tasks.
TASK_IDS = {"ctr": 0, "topk": 1, "rating": 2, "explanation": 3, "review_rating": 4, "next_item": 5}

USERS_SCHEMA = pa.schema([
    ("user_id", pa.int64()),
    ("raw_user_id", pa.string()),
    ("num_interactions", pa.int64()),
    ("is_cold", pa.bool_()),
])

ITEMS_SCHEMA = pa.schema([
    ("item_id", pa.int64()),
    ("raw_item_id", pa.string()),
    ("title", pa.string()),
])

INTERACTIONS_SCHEMA = pa.schema([
    ("user_id", pa.int64()),
    ("item_id", pa.int64()),
    ("rating", pa.float32()),  # null where the source has none (implicit feedback)
    ("timestamp", pa.int64()),  # unix seconds
    ("split", pa.string()),  # train | valid | test (time-based, per user)
    ("is_cold", pa.bool_()),
])

PROMPTS_SCHEMA = pa.schema([
    ("sample_id", pa.string()),  # unique, stable: "<split>-<task>-<n>"
    ("task", pa.string()),  # ctr | topk | rating | explanation | review_rating | next_item
    ("task_id", pa.int8()),  # TASK_IDS[task]
    ("split", pa.string()),
    ("user_id", pa.int64()),
    ("is_cold", pa.bool_()),
    ("history_item_ids", pa.list_(pa.int64())),  # oldest first, only items before the target in time
    ("target_item_ids", pa.list_(pa.int64())),  # ctr/rating/explanation: [item]; topk: the candidates; next_item: []
    # ctr: 1/0; topk: positive candidate index; rating, review_rating: 1-5; explanation: -1; next_item: the item id
    ("label", pa.float32()),
    ("prompt_text", pa.string()),  # text-only form: titles, no placeholders
    ("prompt_hybrid", pa.string()),  # hybrid form: 1 + len(target_item_ids) placeholders
    ("answer", pa.string()),  # answer text, without end-of-sequence
])


def expected_placeholders(num_target_items: int) -> int:
    """Placeholders in a hybrid prompt: one for the user, then one per target/candidate item, in order."""
    return 1 + num_target_items
