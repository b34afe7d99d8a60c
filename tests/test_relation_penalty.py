"""relation_penalty (RAD's N x k epilogue, SPEC §2): the C++ op against the
tensor-op form it replaces, over shapes, dtypes, metrics, margins and
padding; gradcheck, gradgradcheck, opcheck, padding with non-finite values,
argument errors."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from relkd import ops

from helpers import requires_extension

pytestmark = requires_extension
METRICS = ("hinge", "l2", "l1")


def tensor_form(s, t, indices, metric, margin):
    """What RAD computed before the op: phi(s - t) summed where mined."""
    d = s - t
    phi = {"l2": lambda: d.square(), "l1": lambda: d.abs(),
           "hinge": lambda: (d - margin).clamp(min=0)}[metric]()
    mined = indices >= 0
    return torch.where(mined, phi, torch.zeros_like(phi)).sum(), mined.sum()


def case(n, k, dtype, pad, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(n, k, generator=g, dtype=dtype) * 2 - 1
    t = torch.rand(n, k, generator=g, dtype=dtype) * 2 - 1
    indices = torch.randint(0, 1000, (n, k), generator=g)
    indices[torch.rand(n, k, generator=g) < pad] = -1
    return s, t, indices


def with_grads(fn, s, t, indices, metric, margin):
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    total, count = fn(s, t, indices, metric, margin)
    return (total.detach(), count) + torch.autograd.grad(total, (s, t))


@given(n=st.integers(0, 60), k=st.integers(0, 20), metric=st.sampled_from(METRICS),
       margin=st.floats(-0.5, 0.5), pad=st.sampled_from([0.0, 0.4, 1.0]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_matches_the_tensor_form(n, k, metric, margin, pad, dtype, seed):
    s, t, indices = case(n, k, dtype, pad, seed)
    got = with_grads(ops.relation_penalty, s, t, indices, metric, margin)
    want = with_grads(tensor_form, s, t, indices, metric, margin)
    assert got[1].dtype == torch.long and int(got[1]) == int(want[1])
    assert got[0].dtype == dtype and got[2].dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for g, w in zip(got[:1] + got[2:], want[:1] + want[2:]):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("metric", METRICS)
def test_gradcheck_gradgradcheck(metric):
    s, t, indices = case(7, 5, torch.float64, 0.3, seed=1)
    s.requires_grad_()
    t.requires_grad_()

    def total(a, b):
        return ops.relation_penalty(a, b, indices, metric, 0.03)[0]

    assert torch.autograd.gradcheck(total, (s, t))
    assert torch.autograd.gradgradcheck(total, (s, t))


@pytest.mark.parametrize("metric", METRICS)
def test_opcheck(metric):
    s, t, indices = case(6, 4, torch.float64, 0.3, seed=2)
    s.requires_grad_()
    torch.library.opcheck(torch.ops.relkd.relation_penalty.default,
                          (s, t, indices, metric, 0.1))
    torch.library.opcheck(torch.ops.relkd.relation_penalty_backward.default,
                          (torch.tensor(1.5, dtype=torch.float64), s, t, indices, metric, 0.1))


def test_unmined_entries_contribute_nothing_even_when_not_finite():
    s, t, indices = case(5, 4, torch.float32, 0.5, seed=3)
    s[indices < 0] = float("nan")
    t[indices < 0] = float("inf")
    total, count, grad_s, grad_t = with_grads(ops.relation_penalty, s, t, indices, "l2", 0.0)
    clean = indices >= 0
    assert int(count) == int(clean.sum())
    assert math.isfinite(float(total))
    torch.testing.assert_close(total, ((s - t)[clean] ** 2).sum())
    assert torch.isfinite(grad_s).all() and torch.isfinite(grad_t).all()
    assert (grad_s[~clean] == 0).all() and (grad_t[~clean] == 0).all()


@pytest.mark.parametrize("change, message", [
    (lambda a: dict(a, s=a["s"][0]), "s must be 2-D"),
    (lambda a: dict(a, s=a["s"].half(), t=a["t"].half()), "float32 or float64"),
    (lambda a: dict(a, t=a["t"].float()), "same dtype"),
    (lambda a: dict(a, t=a["t"][:, :2]), "t must have the shape of s"),
    (lambda a: dict(a, indices=a["indices"][:2]), "indices must have the shape of s"),
    (lambda a: dict(a, indices=a["indices"].int()), "indices must be int64"),
    (lambda a: dict(a, metric="cosine"), "metric must be"),
    (lambda a: dict(a, margin=float("nan")), "margin must be finite"),
])
def test_bad_arguments_raise_value_errors(change, message):
    s, t, indices = case(4, 3, torch.float64, 0.0, seed=4)
    args = change(dict(s=s, t=t, indices=indices, metric="hinge", margin=0.1))
    with pytest.raises(ValueError, match=message):
        torch.ops.relkd.relation_penalty(args["s"], args["t"], args["indices"], args["metric"],
                                         args["margin"])
