"""``streaming.tokenize_batch`` and its helpers at their edges: the leading special tokens of any tokenizer
convention (``prompt_prefix_ids``), the common-prefix helper, the exact errors for a wrong placeholder count and
for a placeholder in a text-only prompt, and the output schema."""
from __future__ import annotations

import pyarrow as pa
import pytest

from ckf_dist.data.schema import PLACEHOLDER, TASK_IDS
from ckf_dist.data.streaming import TOKENISED_SCHEMA, _common_prefix, prompt_prefix_ids, tokenize_batch
from tests.llama_like_tokenizer import build_llama_like_tokenizer


class StubTokenizer:
    """tokenizer(text) -> ``full``, tokenizer(text, add_special_tokens=False) -> ``plain`` (for the probe text)."""

    def __init__(self, plain, full, special=(1, 2)):
        self.plain, self.full, self.all_special_ids = plain, full, list(special)

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(self.full if add_special_tokens else self.plain)}


@pytest.mark.parametrize("plain,full,want", [
    ([5, 6], [1, 5, 6], [1]),  # BOS (LLaMA)
    ([5, 6], [5, 6], []),  # nothing added (byte-level BPE)
    ([5, 6], [100, 101, 5, 6], [100, 101]),  # a template prefix of ordinary tokens: found by search
    ([5, 6], [1, 5, 6, 2], [1]),  # BOS and EOS: only what comes before the text
    # the text tokenised differently with special tokens: fall back to the leading special tokens
    ([5, 6], [1, 7, 8], [1]),
    ([5, 6], [1, 2, 7], [1, 2]),
    ([5, 6], [7, 8], []),
    ([5], [1, 2], [1, 2]),
])
def test_prompt_prefix_ids_for_every_convention(plain, full, want):
    assert prompt_prefix_ids(StubTokenizer(plain, full)) == want


def test_common_prefix():
    assert _common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert _common_prefix([1, 2], [1, 2, 3]) == 2
    assert _common_prefix([9, 2], [1, 2]) == 0
    assert _common_prefix([], [1]) == 0


@pytest.fixture(scope="module")
def llama():
    return build_llama_like_tokenizer()


def table(hybrid: str, n_targets: int, text: str | None = None) -> pa.Table:
    return pa.table({
        "sample_id": ["s0"], "task_id": pa.array([TASK_IDS["topk"]], pa.int8()), "user_id": pa.array([3], pa.int64()),
        "is_cold": [True], "label": pa.array([1.0], pa.float32()),
        "history_item_ids": pa.array([[1, 2]], pa.list_(pa.int64())),
        "target_item_ids": pa.array([[7] * n_targets], pa.list_(pa.int64())),
        "prompt_text": [hybrid.replace(" " + PLACEHOLDER, "") if text is None else text], "prompt_hybrid": [hybrid],
        "answer": ["delta"]})


GOOD = "The user <cf> interacted with: alpha. Candidates: delta <cf>; omega <cf>. Which will the user choose next?"


def test_output_schema_and_row(llama):
    out = tokenize_batch(table(GOOD, 2), llama, max_seq_len=512)
    assert out.schema.equals(TOKENISED_SCHEMA)
    row = out.to_pylist()[0]
    assert (row["sample_id"], row["task_id"], row["user_id"], row["is_cold"], row["label"]) == ("s0", 1, 3, True, 1.0)
    assert row["history_item_ids"] == [1, 2] and row["target_item_ids"] == [7, 7] and row["truncated"] is False


@pytest.mark.parametrize("hybrid,n_targets,message", [
    (GOOD, 3, f"sample 's0': hybrid prompt has 3 {PLACEHOLDER} tokens, expected 4"),  # a candidate without one
    ("The user interacted with: alpha. Candidates: delta; omega. Which?", 2,
     f"sample 's0': hybrid prompt has 0 {PLACEHOLDER} tokens, expected 3"),  # none at all
])
def test_wrong_placeholder_count_is_refused_naming_the_sample(llama, hybrid, n_targets, message):
    with pytest.raises(ValueError) as err:
        tokenize_batch(table(hybrid, n_targets), llama, max_seq_len=512)
    assert str(err.value) == message  # exactly: no "after cutting" hint when nothing was cut


def test_placeholder_in_the_text_prompt_is_refused(llama):
    with pytest.raises(ValueError) as err:
        tokenize_batch(table(GOOD, 2, text="The user <cf> likes delta."), llama, max_seq_len=512)
    assert str(err.value) == f"sample 's0': text-only prompt contains {PLACEHOLDER}"


def test_a_cut_into_the_targets_is_refused_with_the_hint(llama):
    full = tokenize_batch(table(GOOD, 2), llama, max_seq_len=512).to_pylist()[0]
    max_len = len(full["hybrid_prompt_ids"]) + len(full["answer_ids"]) - 14  # more than the history holds
    with pytest.raises(ValueError) as err:
        tokenize_batch(table(GOOD, 2), llama, max_seq_len=max_len)
    assert str(err.value).startswith("sample 's0': hybrid prompt has ")
    assert str(err.value).endswith(f" {PLACEHOLDER} tokens after cutting it to data.max_seq_len (raise it), expected 3")
