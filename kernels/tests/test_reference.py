"""The PyTorch reference (the spec and CPU path) against the per-row oracle, plus gradcheck in float64."""
from __future__ import annotations

import pytest
import torch

from ckf_dist.kernels import multi_lora_linear, multi_lora_linear_per_row, multi_lora_linear_reference, segment_offsets

CASES = {  # name: (counts per task, d_in, d_out, r, r0, lora_x)
    "mixed": ([3, 5, 2], 7, 6, 3, 2, False),
    "empty_segments": ([0, 4, 0, 3, 0], 5, 4, 2, 3, False),
    "shared_only": ([4, 3], 5, 6, 0, 3, False),
    "task_only": ([2, 0, 5], 6, 5, 4, 0, False),
    "lora_x": ([3, 2, 4], 6, 7, 2, 2, True),
    "no_rows": ([0, 0], 4, 3, 2, 2, False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_per_row(kt, name):
    counts, d_in, d_out, r, r0, lx = CASES[name]
    case = kt.Case(counts, d_in, d_out, r, r0, dtype=torch.float64, lora_x=lx)
    y_ref, g_ref = kt.run(multi_lora_linear_reference, case)

    def per_row(*args, lora_x=None):
        args = list(args)
        args[7] = case.task_ids  # the oracle takes per-row task ids instead of offsets
        if args[0].shape[0] == 0:
            return multi_lora_linear_reference(*args[:7], case.seg, *args[8:], lora_x=lora_x)
        return multi_lora_linear_per_row(*args, lora_x=lora_x)

    y_row, g_row = kt.run(per_row, case)
    kt.close(y_ref, y_row, rtol=1e-7, atol=1e-7, name="y")
    assert g_ref.keys() == g_row.keys()
    for k in g_ref:
        kt.close(g_ref[k], g_row[k], rtol=1e-7, atol=1e-7, name=f"d{k}")


@pytest.mark.parametrize("lx", [False, True])
def test_reference_gradcheck(kt, lx):
    case = kt.Case([2, 0, 3], 4, 3, 2, 2, dtype=torch.float64, lora_x=lx)
    leaves = case.leaves()
    names = list(leaves)

    def f(*tensors):
        kw = dict(zip(names, tensors))
        get = lambda n: kw.get(n, getattr(case, n))  # noqa: E731
        return multi_lora_linear_reference(get("x"), case.weight, get("bias"), get("shared_a"), get("shared_b"),
                                           get("task_a"), get("task_b"), case.seg, case.shared_scale,
                                           case.task_scale, lora_x=get("lora_x"))

    assert torch.autograd.gradcheck(f, tuple(leaves.values()), eps=1e-6, atol=1e-7)


def test_segment_offsets_with_empty_tasks():
    ids = torch.tensor([1, 1, 3, 3, 3])
    assert segment_offsets(ids, 5).tolist() == [0, 0, 2, 2, 5, 5]


def test_dispatch_torch_on_cpu_and_bad_impl(kt):
    case = kt.Case([2, 3], 5, 4, 2, 2)
    y = multi_lora_linear(*case.args(), impl="torch")
    kt.close(y, multi_lora_linear_reference(*case.args()), rtol=0, atol=0, name="impl=torch")
    y_auto = multi_lora_linear(*case.args(), impl="auto")  # CPU tensors: auto = torch reference
    kt.close(y_auto, y, rtol=0, atol=0, name="impl=auto")
    with pytest.raises(ValueError):
        multi_lora_linear(*case.args(), impl="cuda")


# --------------------------------------------------------------------------------------------------------
# Gradient routing (param_grad_rows): adapter parameter gradients sum only over the rows where it is True,
# input gradients over every row; the forward is unchanged.
# --------------------------------------------------------------------------------------------------------
ADAPTER_PARAMS = ("shared_a", "shared_b", "task_a", "task_b")


@pytest.mark.parametrize("pattern", ["mixed", "all", "none"])
@pytest.mark.parametrize("name", ["mixed", "empty_segments", "shared_only", "task_only", "lora_x"])
def test_param_grad_rows_torch_matches_per_row_oracle(kt, name, pattern):
    counts, d_in, d_out, r, r0, lx = CASES[name]
    case = kt.Case(counts, d_in, d_out, r, r0, dtype=torch.float64, lora_x=lx)
    mask = kt.grad_rows(case.x.shape[0], pattern)
    y, g = kt.run(multi_lora_linear, case, impl="torch", param_grad_rows=mask)
    y_row, g_row = kt.run(kt.per_row(case), case, param_grad_rows=mask)
    kt.close(y, y_row, rtol=1e-7, atol=1e-7, name="y")
    assert g.keys() == g_row.keys()
    for k in g:
        kt.close(g[k], g_row[k], rtol=1e-7, atol=1e-7, name=f"d{k}")
    # the routing's own properties, against the unrouted pass: same forward, same input gradients ...
    y_all, g_all = kt.run(multi_lora_linear_reference, case)
    kt.close(y, y_all, rtol=0, atol=0, name="y (routing must not change the forward)")
    for k in ("x", "lora_x", "bias"):
        if k in g:
            kt.close(g[k], g_all[k], rtol=1e-12, atol=1e-12, name=f"d{k} (sums over every row)")
    params = [k for k in ADAPTER_PARAMS if k in g]
    if pattern == "all":
        for k in params:
            kt.close(g[k], g_all[k], rtol=1e-12, atol=1e-12, name=f"d{k} (all rows train)")
    elif pattern == "none":
        for k in params:
            assert torch.count_nonzero(g[k]) == 0, f"d{k} must be 0 when no row trains the adapters"
    else:  # ... and adapter gradients of exactly the kept rows: dy of the other rows zeroed gives the same
        dy_kept = case.dy * mask[:, None]
        saved, case.dy = case.dy, dy_kept
        _, g_kept = kt.run(multi_lora_linear_reference, case)
        case.dy = saved
        for k in params:
            kt.close(g[k], g_kept[k], rtol=1e-10, atol=1e-12, name=f"d{k} (kept rows only)")
            assert not torch.allclose(g[k], g_all[k]), f"d{k}: the mask changed nothing (vacuous case)"

