"""Product-key retrieval vs brute force, fused sparse row ops vs dense autograd, usage formulas."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from moelab import native
from moelab.layers import product_key_kernels as pkk
from moelab.layers import product_keys as pk
from moelab.layers import sparse_rows
from moelab.layers.product_keys import (
    check_product_key_args,
    duplicated_retrievals,
    product_key_topk,
)
from moelab.layers.sparse_rows import RowGroups, gather_dot, weighted_row_sum
from moelab.layers.usage import UsageTracker, usage_and_unevenness


def full_keys(sub_keys_2Sd: torch.Tensor) -> torch.Tensor:
    """All N = S² keys ``key_{i·S+j} = [c_i ; c'_j]`` (the brute-force reference)."""
    c1, c2 = sub_keys_2Sd[0], sub_keys_2Sd[1]
    S = c1.shape[0]
    return torch.cat([c1.repeat_interleave(S, 0), c2.repeat(S, 1)], dim=1)


@pytest.mark.parametrize(
    "S,k,H,shared",
    [(4, 1, 1, True), (8, 3, 2, True), (16, 5, 3, False), (32, 16, 2, True), (64, 8, 2, False)],
)
def test_retrieval_equals_brute_force_topk(S: int, k: int, H: int, shared: bool) -> None:
    g = torch.Generator().manual_seed(S * 100 + k)
    d_key, T = 12, 9
    q = torch.randn(T, H, d_key, generator=g, dtype=torch.float64)
    sub = torch.randn(1 if shared else H, 2, S, d_key // 2, generator=g, dtype=torch.float64)
    scores, idx = product_key_topk(q, sub, k)
    assert scores.shape == idx.shape == (T, H, k)
    for h in range(H):
        keys_N = full_keys(sub[0 if shared else h])
        ref = (q[:, h] @ keys_N.T).topk(k, dim=-1)
        assert torch.equal(idx[:, h], ref.indices), h  # expert ids i·S + j, not grid positions
        torch.testing.assert_close(scores[:, h], ref.values, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("S,k", [(1, 1), (7, 7), (64, 5), (1024, 16), (1024, 32)])
def test_topk_kernel_matches_torch_topk(dtype: torch.dtype, S: int, k: int) -> None:
    x = torch.randn(3, 37, S, dtype=dtype, generator=torch.Generator().manual_seed(S + k))
    v, i = pk.topk_last_dim(x, k)
    ref = x.topk(k, dim=-1)
    assert torch.equal(v, ref.values) and torch.equal(i, ref.indices)


def test_retrieval_scores_are_differentiable_like_brute_force() -> None:
    torch.manual_seed(0)
    q = torch.randn(5, 2, 8, dtype=torch.float64, requires_grad=True)
    sub = torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True)
    scores, _ = product_key_topk(q, sub, 4)
    gq, gk = torch.autograd.grad(scores.sin().sum(), [q, sub])
    keys = full_keys(sub[0])
    ref = torch.einsum("thd,nd->thn", q, keys).topk(4, dim=-1).values
    rq, rk = torch.autograd.grad(ref.sin().sum(), [q, sub])
    torch.testing.assert_close(gq, rq)
    torch.testing.assert_close(gk, rk)


@pytest.mark.parametrize("bag_min_segment", [0, 10**9])  # segment sums: embedding_bag / C
@pytest.mark.parametrize("c_kernels", [True, False])
@pytest.mark.parametrize("sparse", [True, False])
def test_fused_row_ops_match_dense_autograd(
    sparse: bool, c_kernels: bool, bag_min_segment: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sparse_rows, "_GATHER_ROWS", 7)  # force several token chunks (eager path)
    monkeypatch.setattr(sparse_rows, "_BAG_MIN_SEGMENT", bag_min_segment)
    if not c_kernels:
        monkeypatch.setattr(native, "_KERNELS", {})
        monkeypatch.setenv("MOELAB_NO_C_KERNELS", "1")
    else:
        if native.load_c_kernel("rows", sparse_rows._ROWS_C) is None:
            pytest.skip("no C compiler: only the eager path can be checked")
    torch.manual_seed(1)
    N, D, T, R = 20, 6, 11, 7  # R = 7: the gather-dot's blocks of four rows and its tail
    table = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(T, R, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, N, (T, R))  # duplicates within and across tokens
    groups = RowGroups.build(idx)
    h = gather_dot(table, idx, x, groups, sparse)
    y = weighted_row_sum(table, idx, w * h, groups, sparse)
    grads = torch.autograd.grad((y.cos().sum() + h.sum()), [table, x, w])
    assert grads[0].is_sparse == sparse

    rows = table[idx]  # [T, R, D] dense reference
    h_ref = (rows * x[:, None, :]).sum(-1)
    y_ref = ((w * h_ref)[..., None] * rows).sum(1)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(y, y_ref)
    refs = torch.autograd.grad((y_ref.cos().sum() + h_ref.sum()), [table, x, w])
    got_table = grads[0].to_dense() if sparse else grads[0]
    torch.testing.assert_close(got_table, refs[0])
    torch.testing.assert_close(grads[1], refs[1])
    torch.testing.assert_close(grads[2], refs[2])
    if sparse:  # only retrieved rows appear in the gradient
        assert set(grads[0].coalesce().indices()[0].tolist()) == set(idx.flatten().tolist())


@pytest.mark.parametrize("N", [50, 5000])  # most rows retrieved several times / once
@pytest.mark.parametrize("D", [6, 8, 136])  # D % 8 != 0: never streamed
def test_short_segment_sums_equal_index_add(
    D: int, N: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The C segment sums (float32 rows of D % 8 == 0: rows retrieved once written with streaming
    stores, longer segments from their first term) against ``index_add_`` of the weighted rows,
    and bit for bit against the plain kernel."""
    if native.load_c_kernel("rows", sparse_rows._ROWS_C) is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(sparse_rows, "_BAG_MIN_SEGMENT", 10**9)  # always the C kernel
    g = torch.Generator().manual_seed(D + N)
    T, R = 23, 9
    idx = torch.randint(0, N, (T, R), generator=g)
    w, src = torch.randn(T, R, generator=g), torch.randn(T, D, generator=g)
    groups = RowGroups.build(idx, N)
    got = groups.row_sums(w, src)
    terms = w.reshape(-1, 1).double() * src.double().repeat_interleave(R, 0)
    want = torch.zeros(N, D, dtype=torch.float64).index_add_(0, idx.reshape(-1), terms)
    torch.testing.assert_close(got.double(), want[groups.rows_U], rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(sparse_rows, "_STREAM_STORES", False)
    assert torch.equal(got, groups.row_sums(w, src))


def test_usage_and_unevenness_hand_computed() -> None:
    # N = 4 experts, z' = [3, 1, 0, 0]: usage 2/4; z = [.75, .25]; log 4 + .75 log .75 + .25 log .25
    usage, unev = usage_and_unevenness(torch.tensor([3.0, 1.0, 0.0, 0.0]))
    assert usage == 0.5
    assert unev == pytest.approx(math.log(4) + 0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    usage, unev = usage_and_unevenness(torch.ones(8))  # perfectly even: 0
    assert usage == 1.0 and unev == pytest.approx(0.0, abs=1e-12)
    usage, unev = usage_and_unevenness(torch.tensor([0.0, 2.0, 0.0]))  # one expert: log N
    assert unev == pytest.approx(math.log(3))


def test_usage_tracker_accumulates_gates_and_duplicates() -> None:
    tracker = UsageTracker(num_experts=6)
    # token 0: head0 -> {1, 2}, head1 -> {2, 5}; token 1: head0 -> {0, 1}, head1 -> {3, 4}
    idx = torch.tensor([[[1, 2], [2, 5]], [[0, 1], [3, 4]]])
    gate = torch.tensor([[[0.6, 0.4], [0.5, 0.5]], [[0.9, 0.1], [0.2, 0.8]]])
    tracker.update(idx[:1], gate[:1])
    tracker.update(idx[1:], gate[1:])
    torch.testing.assert_close(
        tracker.z_prime, torch.tensor([0.9, 0.7, 0.9, 0.2, 0.8, 0.5], dtype=torch.float64)
    )
    rep = tracker.report()
    assert rep["usage"] == 1.0 and rep["tokens"] == 2
    assert rep["duplicate_fraction"] == pytest.approx(1 / 8)  # expert 2 twice for token 0
    assert duplicated_retrievals(idx).tolist() == [1, 0]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_keys=1000, top_k=4, d_key=8, heads=1), r"perfect square.*961 or 1024"),
        (dict(num_keys=0, top_k=4, d_key=8, heads=1), "num_keys must be a positive"),
        (dict(num_keys=64, top_k=9, d_key=8, heads=1), r"top_k must be .*\[1, 8\]"),
        (dict(num_keys=64, top_k=0, d_key=8, heads=1), "top_k"),
        (dict(num_keys=64, top_k=2, d_key=7, heads=1), "d_key must be an even"),
        (dict(num_keys=64, top_k=2, d_key=8, heads=0), "heads must be"),
    ],
)
def test_argument_errors_name_the_argument(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_product_key_args(keys_name="num_keys", **kwargs)


@pytest.mark.parametrize("S", [64, 1024], ids=["network", "scan"])
@pytest.mark.parametrize("c_kernels", [True, False], ids=["c", "eager"])
@pytest.mark.parametrize("where", [0, 2, 40, -1], ids=["first", "among-first-k", "late", "last"])
def test_nan_scores_raise_on_every_path(
    where: int, c_kernels: bool, S: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NaN among the first k entries used to be selected by the C kernel and block larger values
    (torch.topk selects it first instead): both paths must refuse NaN scores the same way, also
    where the scan's group floor runs first (a NaN group maximum must not hide the NaN)."""
    if not c_kernels:
        monkeypatch.setattr(native, "_KERNELS", {})
        monkeypatch.setenv("MOELAB_NO_C_KERNELS", "1")
    elif native.load_c_kernel("topk", pk._TOPK_C) is None:
        pytest.skip("no C compiler: only the eager path can be checked")
    x = torch.randn(3, 5, S, generator=torch.Generator().manual_seed(where + S))
    pk.topk_last_dim(x, 4)  # finite scores are fine
    x[1, 2, where] = float("nan")
    with pytest.raises(pk.NaNScoresError, match=r"NaN scores in 1 of 15 rows"):
        pk.topk_last_dim(x, 4)
    q = torch.randn(4, 2, 8)
    q[3, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN scores"):
        product_key_topk(q, torch.randn(1, 2, 16, 4), 4)


@pytest.mark.parametrize("candidates", pk.CANDIDATES)
@pytest.mark.parametrize("c_kernels", [True, False], ids=["c", "eager"])
def test_inf_plus_minus_inf_candidates_raise(
    candidates: str, c_kernels: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finite-looking halves can still sum to NaN (+inf + -inf) in the second top-k."""
    if not c_kernels:
        no_c_kernels(monkeypatch)
    q = torch.zeros(1, 1, 4)
    q[0, 0, 0], q[0, 0, 2] = 1.0, 1.0
    sub = torch.zeros(1, 2, 3, 2)
    sub[0, 0, :, 0], sub[0, 1, :, 0] = float("inf"), float("-inf")
    with pytest.raises(pk.NaNScoresError):
        product_key_topk(q, sub, 2, candidates=candidates)


def test_nan_input_to_peer_raises_clearly() -> None:
    from moelab.layers.peer import PEER

    layer = PEER(8, num_experts=64, heads=2, top_k=4, d_key=4).eval()
    x = torch.randn(3, 8)
    x[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN scores"):
        layer(x)


# ----------------------------------------------------------------------------- staircase candidates


def no_c_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_KERNELS", {})
    monkeypatch.setenv("MOELAB_NO_C_KERNELS", "1")


@pytest.mark.parametrize("k,count", [(1, 1), (4, 8), (16, 50), (36, 140)])
def test_staircase_pairs_are_the_undominated_grid_positions(k: int, count: int) -> None:
    pa, pb = pk.staircase_pairs(k)
    got = list(zip(pa.tolist(), pb.tolist(), strict=True))
    # written differently: scan the whole grid and keep what fewer than k positions dominate
    ref = [
        (a, b)
        for a in range(k)
        for b in range(k)
        if sum(1 for x in range(a + 1) for _ in range(b + 1)) <= k
    ]
    assert got == ref and len(got) == count
    assert pk.staircase_pairs(k)[0] is pa  # cached: built once per k


@pytest.mark.parametrize("c_kernels", [True, False], ids=["c", "eager"])
def test_pair_topk_matches_a_loop_with_first_listed_pair_winning_ties(
    c_kernels: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not c_kernels:
        no_c_kernels(monkeypatch)
    g = torch.Generator().manual_seed(3)
    k, rows = 8, 40
    v0 = torch.randint(-3, 4, (rows, k), generator=g).double().sort(-1, descending=True).values
    v1 = torch.randint(-3, 4, (rows, k), generator=g).double().sort(-1, descending=True).values
    S = 50  # sub-key ids of the two halves' lists, for the expert ids select_pairs writes
    i0 = torch.randint(0, S, (rows, k), generator=g)
    i1 = torch.randint(0, S, (rows, k), generator=g)
    for pa, pb in [pk.staircase_pairs(k), (torch.arange(k * k) // k, torch.arange(k * k) % k)]:
        got = pk.pair_topk(v0, v1, pa, pb, k)
        a, b, ids = pkk.select_pairs(v0, v1, i0, i1, pa, pb, k, S)
        for r in range(rows):
            sums = [v0[r, a].item() + v1[r, b].item() for a, b in zip(pa, pb, strict=True)]
            ref = sorted(range(len(sums)), key=lambda c: (-sums[c], c))[:k]
            assert got[r].tolist() == ref, r
            assert a[r].tolist() == [pa[c].item() for c in ref], r
            assert b[r].tolist() == [pb[c].item() for c in ref], r
            want_ids = [i0[r, pa[c]].item() * S + i1[r, pb[c]].item() for c in ref]
            assert ids[r].tolist() == want_ids, r


def lexicographic_brute_force(q_Td: torch.Tensor, sub_2Sd: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k ids over all N keys ordered by (score, first-half score, -i, second-half score, -j):
    the documented tie rule, by stable sorts from the least significant key (exact for integer
    data)."""
    half = sub_2Sd.shape[-1]
    S = sub_2Sd.shape[1]
    out = []
    for q in q_Td:
        s1 = (sub_2Sd[0] @ q[:half]).repeat_interleave(S)  # [N], key i·S + j
        s2 = (sub_2Sd[1] @ q[half:]).repeat(S)
        ids = torch.arange(S * S)
        keys = [-(s1 + s2), -s1, ids // S, -s2, ids % S]
        perm = ids
        for key in reversed(keys):
            perm = perm[key[perm].sort(stable=True).indices]
        out.append(perm[:k])
    return torch.stack(out)


@pytest.mark.parametrize("S,T", [(64, 12), pytest.param(1024, 3, marks=pytest.mark.slow)])
def test_staircase_with_ties_equals_lexicographic_brute_force(S: int, T: int) -> None:
    if native.load_c_kernel("topk", pk._TOPK_C) is None:
        pytest.skip("the half top-k's tie order (lower id first) is the C kernel's")
    g = torch.Generator().manual_seed(S)
    H, d_key, k = 2, 4, 16
    q = torch.randint(-1, 2, (T, H, d_key), generator=g).double()  # few values: many exact ties
    sub = torch.randint(-1, 2, (H, 2, S, d_key // 2), generator=g).double()
    scores, idx = product_key_topk(q, sub, k)
    for h in range(H):
        ref = lexicographic_brute_force(q[:, h], sub[h], k)
        assert torch.equal(idx[:, h], ref), h
        brute = q[:, h] @ full_keys(sub[h]).T
        assert torch.equal(scores[:, h], brute.gather(1, ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("S,T", [(64, 50), (1024, 4)])
def test_staircase_equals_grid_and_brute_force(S: int, T: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(S + T)
    H, d_key, k = 3, 16, 16
    q = torch.randn(T, H, d_key, generator=g, dtype=dtype)
    sub = torch.randn(1, 2, S, d_key // 2, generator=g, dtype=dtype)
    s_st, i_st = product_key_topk(q, sub, k)
    s_gr, i_gr = product_key_topk(q, sub, k, candidates="grid")
    assert torch.equal(i_st, i_gr) and torch.equal(s_st, s_gr)
    ref = torch.einsum("thd,nd->thn", q.double(), full_keys(sub[0].double())).topk(k, dim=-1)
    assert torch.equal(i_st, ref.indices)  # expert ids i·S + j
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(s_st.double(), ref.values, rtol=tol, atol=tol)


@pytest.mark.parametrize("shared", [True, False])
def test_staircase_gradients_match_grid_and_finite_differences(shared: bool) -> None:
    g = torch.Generator().manual_seed(7)
    T, H, d_key, S, k = 4, 2, 4, 8, 4
    q = torch.randn(T, H, d_key, generator=g, dtype=torch.float64, requires_grad=True)
    sub = torch.randn(1 if shared else H, 2, S, d_key // 2, generator=g, dtype=torch.float64)
    sub.requires_grad_()
    w = torch.randn(T, H, k, generator=g, dtype=torch.float64)
    grads = {}
    for cand in pk.CANDIDATES:
        scores, _ = product_key_topk(q, sub, k, candidates=cand)
        grads[cand] = torch.autograd.grad((scores * w).sum(), [q, sub])
    for a, b in zip(grads["staircase"], grads["grid"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # finite differences along random directions (central, float64): no near-tie flips at eps
    for seed in range(3):
        dq = torch.randn(q.shape, generator=g.manual_seed(seed), dtype=torch.float64)
        ds = torch.randn(sub.shape, generator=g, dtype=torch.float64)
        eps = 1e-6
        with torch.no_grad():
            plus = (product_key_topk(q + eps * dq, sub + eps * ds, k)[0] * w).sum()
            minus = (product_key_topk(q - eps * dq, sub - eps * ds, k)[0] * w).sum()
        numeric = (plus - minus) / (2 * eps)
        analytic = (grads["staircase"][0] * dq).sum() + (grads["staircase"][1] * ds).sum()
        assert abs(numeric - analytic) < 1e-6, (seed, numeric, analytic)


def test_unknown_candidates_value_is_named() -> None:
    with pytest.raises(ValueError, match=r"candidates must be one of \('staircase', 'grid'\)"):
        product_key_topk(torch.randn(2, 1, 4), torch.randn(1, 2, 4, 2), 2, candidates="k2")


@pytest.mark.parametrize("S", [6, 20], ids=["dense", "sparse"])  # 2k >= S: dense score grads
@pytest.mark.parametrize("c_kernels", [True, False], ids=["c", "eager"])
def test_subkey_grads_match_a_one_hot_reference(
    c_kernels: bool, S: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The half top-k's backward (a fused scatter in C, segment sums eagerly, a dense score
    gradient when most scores are selected) against the dense formula ``g`` scattered to one-hot
    ``[B, T, S]`` scores, written out as a loop."""
    if not c_kernels:
        no_c_kernels(monkeypatch)
    elif native.load_c_kernel("subkey_grads", pkk._SUBKEY_GRADS_C) is None:
        pytest.skip("no C compiler: only the eager path can be checked")
    g = torch.Generator().manual_seed(11)
    B, T, K, d = 3, 9, 4, 5
    q = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    keys = torch.randn(B, S, d, generator=g, dtype=torch.float64)
    idx = torch.randint(0, S, (B, T, K), generator=g)  # repeats within and across tokens
    grad = torch.randn(B, T, K, generator=g, dtype=torch.float64)
    dense = torch.zeros(B, T, S, dtype=torch.float64)
    for b, t, k in itertools.product(range(B), range(T), range(K)):
        dense[b, t, idx[b, t, k]] += grad[b, t, k]
    g_q, g_keys = pkk.subkey_grads(q, keys, idx, grad, True, True)
    torch.testing.assert_close(g_q, torch.bmm(dense, keys))
    torch.testing.assert_close(g_keys, torch.bmm(dense.transpose(1, 2), q))
    only_q = pkk.subkey_grads(q, keys, idx, grad, True, False)
    assert only_q[1] is None and torch.equal(only_q[0], g_q)


def test_repeated_in_token_counts_like_duplicated_retrievals() -> None:
    g = torch.Generator().manual_seed(5)
    for T, R, N in [(0, 4, 8), (1, 1, 3), (13, 6, 5), (40, 12, 50)]:
        idx = torch.randint(0, N, (T, R), generator=g)
        got = RowGroups.build(idx).repeated_in_token()
        assert int(got) == int(duplicated_retrievals(idx.view(T, 1, R)).sum()), (T, R, N)


@pytest.mark.parametrize("c_kernels", [True, False], ids=["c", "eager"])
@pytest.mark.parametrize(
    "v0,v1",
    [
        ([5.0, 4.0, 3.0, float("-inf")], [float("inf"), 1.0, 0.0, -1.0]),  # only (K-1, 0) is NaN
        ([float("inf"), 4.0, 3.0, 2.0], [3.0, 1.0, 0.0, float("-inf")]),  # only (0, K-1) is NaN
        ([5.0, float("nan"), 3.0, 2.0], [3.0, 1.0, 0.0, -1.0]),
    ],
)
def test_pair_topk_finds_every_nan_sum(
    v0: list, v1: list, c_kernels: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel stops early (rows that cannot enter); a NaN sum must still be found."""
    if not c_kernels:
        no_c_kernels(monkeypatch)
    ok = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    pa, pb = pk.staircase_pairs(4)
    pk.pair_topk(ok, ok, pa, pb, 4)
    with pytest.raises(pk.NaNScoresError, match="1 of 2 rows"):
        pk.pair_topk(
            torch.cat([ok, torch.tensor([v0])]), torch.cat([ok, torch.tensor([v1])]), pa, pb, 4
        )


@pytest.mark.parametrize("N", [1, 7, 64, 5000])
def test_row_groups_counting_sort_equals_the_stable_sort(N: int) -> None:
    """The C counting sort (``num_rows`` given) returns exactly the groups of the stable sort:
    same order (a row's retrievals in token order), tokens, distinct rows and offsets; an id out
    of range falls back to the sort path, whose indexing reports it."""
    if native.load_c_kernel("group_rows", sparse_rows._GROUP_C) is None:
        pytest.skip("no C compiler: only the sort path exists")
    g = torch.Generator().manual_seed(N)
    for T, R in [(1, 1), (13, 5), (300, 24)]:
        idx = torch.randint(0, N, (T, R), generator=g)
        ref = RowGroups.build(idx)
        got = RowGroups.build(idx, N)
        for name in ("order_M", "tok_M", "rows_U", "offsets_U"):
            assert torch.equal(getattr(got, name), getattr(ref, name)), name
        if T * R > 100:
            continue
        # a loop reference for the grouping itself
        for u, (row, start) in enumerate(
            zip(got.rows_U.tolist(), got.offsets_U.tolist(), strict=True)
        ):
            end = got.offsets_U[u + 1].item() if u + 1 < got.rows_U.numel() else T * R
            flat = idx.reshape(-1)
            want = [m for m in range(T * R) if flat[m] == row]
            assert got.order_M[start:end].tolist() == want
    bad = torch.tensor([[0, N]])  # N is out of range: the sort path takes it unchanged
    assert torch.equal(RowGroups.build(bad, N).rows_U, torch.tensor([0, N]))


@pytest.mark.parametrize("path", ["avx2", "buffer"])
@pytest.mark.parametrize(
    "S,k",
    [
        (1, 1),
        (5, 5),
        (50, 16),
        (64, 36),
        (64, 64),
        (100, 7),
        (128, 32),
        (129, 5),
        (136, 17),  # groups of 8: the shortest the group floor takes
        (256, 16),
        (1000, 16),
        (1024, 16),
    ],
)
def test_topk_orders_by_value_then_lower_index_on_every_path(
    path: str, S: int, k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """float32 rows of S <= 128 go through the sorting network (8 rows per AVX2 vector), longer
    ones through the buffer with 8-wide rejection after the group floor (entries below the least
    of k group maxima skipped), and without AVX2 everything through the scalar buffer: each must
    return the stable descending order (a tie goes to the lower index), with ties, ±inf, the
    largest entries all in one group and a row count that is not a multiple of 8."""
    if native.load_c_kernel("topk", pk._TOPK_C) is None:
        pytest.skip("no C compiler")
    if path == "avx2" and pkk.avx2_topk_lib() is None:
        pytest.skip("no AVX2: only the scalar buffer is built")
    if path == "buffer":
        monkeypatch.setattr(pkk, "avx2_topk_lib", lambda: None)
    g = torch.Generator().manual_seed(S * 131 + k)
    for x in (
        torch.randn(3, 13, S, generator=g),
        torch.randint(-2, 3, (21, S), generator=g).float(),  # most entries tie
        torch.arange(S, dtype=torch.float32).flip(0).repeat(9, 1),  # the top k in group 0
    ):
        x[0, ..., 0] = float("-inf")
        x[-1, ..., -1] = float("inf")
        v, i = pk.topk_last_dim(x, k)
        ref = x.sort(dim=-1, descending=True, stable=True)
        assert torch.equal(v, ref.values[..., :k]) and torch.equal(i, ref.indices[..., :k])


@pytest.mark.parametrize("S", [24, 64, 100])
def test_network_counts_nan_rows_in_whole_and_partial_blocks(S: int) -> None:
    """The network reads 8 whole rows at a time by transposes (S a multiple of 8) and the last
    rows one entry at a time: NaN rows must be counted alike in both, one per row however many
    NaNs it holds (rows 2 and 5 of the first block, 9 of the second, 17 of the partial one)."""
    if native.load_c_kernel("topk", pk._TOPK_C) is None or pkk.avx2_topk_lib() is None:
        pytest.skip("no C compiler or no AVX2")
    x = torch.randn(19, S, generator=torch.Generator().manual_seed(S))
    for row, cols in ((2, [0]), (5, [S - 1, 3]), (9, [S // 2]), (17, [1, 2, S - 2])):
        x[row, cols] = float("nan")
    with pytest.raises(pk.NaNScoresError, match=r"NaN scores in 4 of 19 rows"):
        pk.topk_last_dim(x, 5)
