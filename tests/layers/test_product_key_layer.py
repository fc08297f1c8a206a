"""What PEER and PKM share through ProductKeyLayer: input checks, padding, integral sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moelab.layers.peer import PEER
from moelab.layers.pkm import PKM
from moelab.layers.product_keys import check_product_key_args, duplicated_retrievals
from moelab.train.optim import build_optimizer


def _layer(kind: str, **kw: object) -> PEER | PKM:
    if kind == "peer":
        return PEER(8, num_experts=kw.pop("n", 1024), heads=2, top_k=4, d_key=4, **kw)
    return PKM(8, num_memories=kw.pop("n", 1024), heads=2, top_k=4, d_key=4, **kw)


TABLES = {"peer": ("u", "v"), "pkm": ("values",)}


# --------------------------------------------------------------------------- input checks (#9.4)
@pytest.mark.parametrize("kind", ["peer", "pkm"])
def test_wrong_width_is_rejected_not_resplit(kind: str) -> None:
    """x [3, 16] used to run as 6 tokens of width 8 and come back as [3, 16]."""
    layer = _layer(kind)
    name = type(layer).__name__
    with pytest.raises(ValueError, match=rf"{name} expects x of shape \[\.\.\., d_model=8\], got"):
        layer(torch.randn(3, 16))
    with pytest.raises(ValueError, match="d_model=8"):
        layer(torch.randn(3, 4))
    with pytest.raises(ValueError, match="d_model=8"):
        layer(torch.tensor(1.0))


@pytest.mark.parametrize("kind", ["peer", "pkm"])
def test_non_float_input_and_bad_token_mask_are_rejected(kind: str) -> None:
    layer = _layer(kind)
    with pytest.raises(ValueError, match="floating-point x, got dtype torch.int64"):
        layer(torch.ones(3, 8, dtype=torch.long))
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"token_mask must have the leading shape of x \(2, 3\)"):
        layer(x, token_mask=torch.ones(6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"token_mask must have the leading shape"):
        layer(x, token_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_mask must be bool"):
        layer(x, token_mask=torch.ones(2, 3))
    assert layer(x, token_mask=torch.ones(2, 3, dtype=torch.long)).shape == x.shape  # 0/1 ints ok


# --------------------------------------------------------------------------- padding (#9.5)
@pytest.mark.parametrize("kind", ["peer", "pkm"])
def test_padding_touches_no_row(kind: str) -> None:
    """Rows retrieved only by padding tokens get no gradient entry and are unchanged by a step
    (weight decay included); everything else equals a run on the valid tokens alone."""
    torch.manual_seed(0)
    a = _layer(kind, dtype=torch.float64)
    b = _layer(kind, dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = mask[2, 1:] = False
    x[~mask] *= 5.0  # padding content unlike the real tokens: it retrieves other rows
    with torch.no_grad():  # the rows padding would retrieve (fresh BN: running stats = identity)
        _, pad_idx = a.eval().retrieve(x[~mask])
        a.train()
    opt_a = build_optimizer(a, lr=1e-2, weight_decay=0.5)
    opt_b = build_optimizer(b, lr=1e-2, weight_decay=0.5)
    before = {n: t.detach().clone() for n, t in a.named_parameters()}

    ya = a(x, token_mask=mask)
    yb = b(x[mask])
    torch.testing.assert_close(ya[mask], yb)
    (ya * mask[..., None]).square().sum().backward()
    yb.square().sum().backward()
    for name in TABLES[kind]:
        rows_a = getattr(a, name).grad.coalesce().indices()[0]
        rows_b = getattr(b, name).grad.coalesce().indices()[0]
        assert torch.equal(rows_a, rows_b), name  # no gradient entry from padding
        pad_only = set(pad_idx.flatten().tolist()) - set(rows_b.tolist())
        assert pad_only, "padding must retrieve some rows no real token retrieves"
    opt_a.step()
    opt_b.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-12, msg=name)
    for name in TABLES[kind]:
        rows = sorted(pad_only)
        assert torch.equal(getattr(a, name).detach()[rows], before[name][rows]), name
        assert not opt_a.state[getattr(a, name)]["row_step"][rows].any()
    assert int(a.last_stats.num_tokens) == int(mask.sum())
    assert int(a.last_stats.distinct_experts) == int(b.last_stats.distinct_experts)
    assert not ya[~mask].any()  # padding output is zero


@pytest.mark.parametrize("kind", ["peer", "pkm"])
@pytest.mark.parametrize("case", ["empty", "empty-batch", "all-padding"])
def test_empty_and_all_padding_inputs_give_zero_output(kind: str, case: str) -> None:
    torch.manual_seed(1)
    layer = _layer(kind)
    opt = build_optimizer(layer, lr=1e-2, weight_decay=0.5)
    before = [p.detach().clone() for p in layer.parameters()]
    shape = {"empty": (0, 8), "empty-batch": (2, 0, 8), "all-padding": (2, 3, 8)}[case]
    x = torch.randn(*shape, requires_grad=True)
    mask = torch.zeros(shape[:-1], dtype=torch.bool) if case == "all-padding" else None
    y = layer(x, token_mask=mask)
    assert y.shape == x.shape and y.dtype == x.dtype and not y.any()
    y.square().sum().backward()  # no crash; nothing to learn from
    assert x.grad is not None and not x.grad.any()
    assert int(layer.last_stats.num_tokens) == 0
    for name in TABLES[kind]:
        assert getattr(layer, name).grad is None
    opt.step()
    for p, p0 in zip(layer.parameters(), before, strict=True):
        assert torch.equal(p, p0)
    assert layer.query_bn.num_batches_tracked == 0


def test_observer_sees_valid_tokens_at_their_positions() -> None:
    layer = _layer("peer").eval()
    seen = []
    layer.routing_observer = lambda lyr, d, x: seen.append(d)
    mask = torch.tensor([True, False, True])
    with torch.no_grad():
        layer(torch.randn(3, 8), token_mask=mask)
    d = seen[0]
    assert d.num_tokens == 3 and set(d.token_idx_N.tolist()) == {0, 2}
    assert d.num_assignments == 2 * 2 * 4


# --------------------------------------------------------------------------- integral sizes (#9.7)
@pytest.mark.parametrize("kind", ["peer", "pkm"])
def test_numpy_integer_sizes_are_accepted(kind: str) -> None:
    """np.int64(4096) is not an ``int`` and used to fail as "must be a perfect square"."""
    n, i = np.int64(64), np.int32
    if kind == "peer":
        layer = PEER(i(8), num_experts=n, heads=i(2), top_k=np.int64(4), d_key=np.int16(4))
        assert layer.num_experts == 64 and type(layer.num_experts) is int
    else:
        layer = PKM(i(8), num_memories=n, heads=i(2), top_k=np.int64(4), d_key=np.int16(4))
        assert layer.num_memories == 64 and type(layer.num_memories) is int
    for attr in ("d_model", "num_experts", "heads", "top_k", "d_key", "num_sub_keys"):
        assert type(getattr(layer, attr)) is int, attr
    assert layer(torch.randn(5, 8)).shape == (5, 8)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_keys=True, top_k=1, d_key=8, heads=1), "num_keys must be a positive"),
        (dict(num_keys=64.0, top_k=2, d_key=8, heads=1), "num_keys must be a positive"),
        (dict(num_keys=64, top_k=True, d_key=8, heads=1), "top_k must be an integer"),
        (dict(num_keys=64, top_k=2.0, d_key=8, heads=1), "top_k must be an integer"),
        (dict(num_keys=64, top_k=2, d_key=np.float64(8), heads=1), "d_key must be an even"),
        (dict(num_keys=64, top_k=2, d_key=8, heads=True), "heads must be"),
    ],
)
def test_bools_and_floats_are_not_sizes(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_product_key_args(keys_name="num_keys", **kwargs)
    assert (
        check_product_key_args(
            keys_name="n", num_keys=np.uint16(64), top_k=np.int8(2), d_key=np.int64(8), heads=1
        )
        == 8
    )


# --------------------------------------------------------------------------- statistics (#23)
@pytest.mark.parametrize("kind", ["peer", "pkm"])
@pytest.mark.parametrize("candidates", ["staircase", "grid"])
def test_duplicate_count_from_row_groups_matches_per_token_sort(kind: str, candidates: str) -> None:
    """``last_stats`` counts retrievals repeated across heads from the forward's row grouping
    (no per-token sort); it must equal the per-token sort of the retrieved ids."""
    torch.manual_seed(0)
    layer = _layer(kind, n=16, query_batchnorm=False)  # 16 rows, 2 heads x 4: many repeats
    layer.candidates = candidates
    x = torch.randn(2, 7, 8)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    layer(x, token_mask=mask).sum().backward()
    with torch.no_grad():
        _, idx = layer.retrieve(x[mask])
    expected = int(duplicated_retrievals(idx).sum())
    assert expected > 0
    assert int(layer.last_stats.extra["duplicate_retrievals"]) == expected
