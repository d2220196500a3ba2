import numpy as np
import torch

from ckf_dist.data.collate import IGNORE, collate_prompts


def _rows():
    rng = np.random.default_rng(0)
    n = 9
    tasks = rng.integers(0, 4, size=n)
    tasks[0] = 2  # make sure task 3 or some task may be absent: empty segments must work
    mk = lambda lo, hi: np.empty(n, dtype=object)
    batch = {"task_id": tasks.astype(np.int8), "user_id": np.arange(n) + 100, "label": rng.random(n).astype(np.float32)}
    for key, lo, hi in (("text_prompt_ids", 3, 9), ("hybrid_prompt_ids", 4, 11), ("answer_ids", 1, 4),
                        ("history_item_ids", 0, 5), ("target_item_ids", 1, 5)):
        col = mk(lo, hi)
        for i in range(n):
            col[i] = rng.integers(5, 50, size=rng.integers(lo, hi))
        batch[key] = col
    return batch


def test_rows_sorted_by_task_with_offsets():
    b = _rows()
    out = collate_prompts(b, pad_id=0, num_tasks=4)
    tasks = out["task_ids"]
    assert out["input_ids"].shape[0] == 2 * len(b["task_id"])
    assert torch.all(tasks[1:] >= tasks[:-1])
    off = out["row_offsets"]
    assert off[0] == 0 and off[-1] == tasks.numel() and off.numel() == 5
    for t in range(4):
        assert torch.all(tasks[off[t]:off[t + 1]] == t)
        assert int((tasks == t).sum()) == int(off[t + 1] - off[t])


def test_each_row_matches_its_source_sample():
    b = _rows()
    out = collate_prompts(b, pad_id=0, num_tasks=4)
    for r in range(out["input_ids"].shape[0]):
        i = int(out["sample_index"][r])
        form = "hybrid_prompt_ids" if out["is_hybrid"][r] else "text_prompt_ids"
        p, a = b[form][i], b["answer_ids"][i]
        n = len(p) + len(a)
        assert out["input_ids"][r, :n].tolist() == list(p) + list(a)
        assert out["attention_mask"][r].sum() == n
        lab = out["labels"][r]
        assert torch.all(lab[: len(p)] == IGNORE) and lab[len(p):n].tolist() == list(a) and torch.all(lab[n:] == IGNORE)
        assert out["user_ids"][r] == b["user_id"][i] and out["task_ids"][r] == b["task_id"][i]
        assert out["n_targets"][r] == len(b["target_item_ids"][i])
        h = out["history"][r]
        assert h[h >= 0].tolist() == list(b["history_item_ids"][i])


def test_hybrid_only_form():
    b = _rows()
    out = collate_prompts(b, pad_id=0, num_tasks=4, forms=("hybrid",))
    assert out["is_hybrid"].all() and out["input_ids"].shape[0] == len(b["task_id"])
