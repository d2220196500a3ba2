"""The resume data position (worker._batches): batches consumed before a checkpoint are skipped within the
interrupted epoch, later epochs start from the beginning with their own shuffle seed."""
import pytest

from ckf_dist.config import load_config
from ckf_dist.worker import _batches


class FakeShard:
    """iter_torch_batches over n_batches fixed batches (the collate function is applied to a marker dict)."""

    def __init__(self, n_batches: int):
        self.n_batches = n_batches
        self.seeds = []

    def iter_torch_batches(self, batch_size, collate_fn, drop_last, local_shuffle_buffer_size, local_shuffle_seed):
        self.seeds.append(local_shuffle_seed)
        for b in range(self.n_batches):
            yield ("batch", local_shuffle_seed, b)


def _take(gen, n):
    return [next(gen) for _ in range(n)]


def test_resume_skips_the_consumed_batches_of_the_interrupted_epoch_only():
    cfg = load_config(["training.seed=7"])
    shard = FakeShard(5)
    got = _take(_batches(shard, cfg, pad_id=0, start_epoch=2, skip=3, rank=1), 6)
    # epoch 2 resumes at its 4th batch (index 3), then epoch 3 starts at index 0
    assert [(e, i) for e, i, _ in got] == [(2, 3), (2, 4), (3, 0), (3, 1), (3, 2), (3, 3)]
    assert [b[2] for _, _, b in got] == [3, 4, 0, 1, 2, 3]
    # each epoch (and rank) has its own local shuffle seed: seed + 1000 * epoch + rank
    assert shard.seeds[:2] == [7 + 2000 + 1, 7 + 3000 + 1]


def test_a_fresh_start_consumes_every_batch_and_an_empty_shard_is_an_error():
    cfg = load_config([])
    got = _take(_batches(FakeShard(2), cfg, 0, start_epoch=0, skip=0, rank=0), 3)
    assert [(e, i) for e, i, _ in got] == [(0, 0), (0, 1), (1, 0)]
    with pytest.raises(RuntimeError, match="no full batch"):
        next(_batches(FakeShard(0), cfg, 0, start_epoch=0, skip=0, rank=0))
