"""training.max_minutes: the clock that ends training on steps or time and drives the schedules."""
import pytest

from ckf_dist.model.ckf import curriculum_text_weight
from ckf_dist.worker import TrainingClock, lr_lambda


def test_without_a_budget_the_effective_step_is_the_step():
    clock = TrainingClock(max_steps=100, max_minutes=0.0, seconds_before=1e6)
    assert clock.effective_step(7) == 7.0
    assert not clock.done(99) and clock.done(100)
    assert clock.stopped_by(100) == "max_steps"


def test_a_time_budget_ends_training_and_runs_the_schedules_to_their_end():
    clock = TrainingClock(max_steps=1000, max_minutes=2.0)  # 120 s
    clock.seconds = 60.0  # half the budget after only 10 steps
    assert clock.effective_step(10) == pytest.approx(500.0)
    assert not clock.done(10)
    # the lr schedule and the curriculum are at their half-way points, not at 1% of max_steps
    lr = lr_lambda(50, 1000)
    assert lr(clock.effective_step(10)) == pytest.approx(lr(500))
    assert curriculum_text_weight("sigmoid", clock.effective_step(10), 1000) == pytest.approx(0.5)
    clock.seconds = 120.0
    assert clock.done(20) and clock.stopped_by(20) == "max_minutes"
    assert lr(clock.effective_step(20)) == 0.0


def test_steps_can_still_end_training_first_and_resume_counts_earlier_time():
    clock = TrainingClock(max_steps=10, max_minutes=60.0, seconds_before=30.0)
    assert clock.effective_step(10) == 10.0 and clock.done(10) and clock.stopped_by(10) == "max_steps"
    # a resumed run that had already used its budget does not train again
    spent = TrainingClock(max_steps=10, max_minutes=1.0, seconds_before=61.0)
    assert spent.done(3)


def test_sync_without_a_process_group_keeps_local_seconds():
    clock = TrainingClock(max_steps=10, max_minutes=1.0)
    clock.seconds = 5.0
    clock.sync("cpu")
    assert clock.seconds == 5.0


def _clock_rank(rank: int, port: int, seconds: list, out):
    import torch.distributed as dist

    from ckf_dist.worker import TrainingClock

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        clock = TrainingClock(max_steps=1000, max_minutes=1.0)  # 60 s budget
        stopped = None
        for step, s in enumerate(seconds[rank], start=1):  # this rank's own clock readings, step by step
            clock.seconds = s
            clock.sync(torch_device())
            if clock.done(step):
                stopped = step
                break
        out.put((rank, stopped, clock.seconds))
    finally:
        dist.destroy_process_group()


def torch_device():
    import torch

    return torch.device("cpu")


def test_ranks_agree_on_the_time_budget_stop():
    """Each rank measures its own seconds; without the all-reduce in TrainingClock.sync the slower rank would stop
    one step earlier than the other and the next collective would hang. With it both stop at the same step."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # rank 1 runs 1.5 s behind rank 0: it crosses the 60 s budget at step 4, rank 0 only at step 5
    seconds = [[20.0, 35.0, 50.0, 59.0, 61.0, 70.0], [21.5, 36.5, 51.5, 60.5, 62.5, 71.5]]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_clock_rank, args=(r, port, seconds, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [r[1] for r in results] == [4, 4], results  # both stop at step 4 (the slower rank's)
    assert [r[2] for r in results] == [60.5, 60.5]  # and agree on the seconds used
