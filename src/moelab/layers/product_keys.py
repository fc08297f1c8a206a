"""Product-key retrieval: each query head's exact top-k of N = S² keys, without scoring all N.

* :func:`product_key_topk` - exact top-k over N = S² product keys at cost O(S·d_key + k·ln k)
  (Lample et al. 2019, "Large Memory Layers with Product Keys", §3.2; PEER, He 2024, §2), with a
  backward that touches only the selected sub-keys; :func:`staircase_pairs` are the only grid
  candidates that can win, :func:`pair_topk` ranks them.
* :func:`normalize_queries` - query batch normalisation that ignores padding tokens.
* :func:`check_product_key_args` - the hyper-parameter checks both layers share;
  :func:`as_int` - the integer check behind them.
* :func:`duplicated_retrievals` - retrievals one head repeats from another.

Shape legend (see ``moelab.layers.base``): T tokens, H heads, K top-k, S sub-keys per half (√N),
C = Σ_a ⌊K/a⌋ candidates per head (K² on the grid path), B = 2·H (head, half) pairs,
d = d_key / 2 (one half of a key).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.layers.product_key_kernels import (
    _TOPK_C,  # noqa: F401 - re-exported for the tests' compiler checks
    NaNScoresError,
    _nan_error,
    pair_topk,
    select_pairs,
    subkey_grads,
    topk_last_dim,
)

__all__ = [
    "CANDIDATES",
    "NaNScoresError",
    "as_int",
    "check_product_key_args",
    "combine_halves",
    "duplicated_retrievals",
    "half_topk",
    "normalize_queries",
    "pair_topk",
    "product_key_topk",
    "staircase_pairs",
    "topk_last_dim",
]


def as_int(value: object) -> int | None:
    """``value`` as a Python int if it is an integral number (``numbers.Integral``: numpy integer
    scalars included, bool excluded), else None.

    Sizes often come from numpy (``np.int64``), which is not an ``int`` subclass; rejecting one as
    "not a perfect square" would be misleading.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def check_product_key_args(
    *, num_keys: int, top_k: int, d_key: int, heads: int, keys_name: str
) -> int:
    """Validate product-key hyper-parameters; return S = √N. Errors name the argument.

    Integral numbers of any type (``np.int64`` ...) are accepted (see :func:`as_int`); callers
    store ``int(value)``.
    """
    n, k, dk, h = (as_int(v) for v in (num_keys, top_k, d_key, heads))
    if n is None or n < 1:
        raise ValueError(
            f"{keys_name} must be a positive perfect square (e.g. 1024**2), got {num_keys!r}"
        )
    s = math.isqrt(n)
    if s * s != n:
        raise ValueError(
            f"{keys_name} must be a perfect square (product keys use √{keys_name} sub-keys per "
            f"half), got {n}; nearest allowed values: {s * s} or {(s + 1) ** 2}"
        )
    if k is None or k < 1 or k > s:
        raise ValueError(f"top_k must be an integer in [1, √{keys_name}] = [1, {s}], got {top_k!r}")
    if dk is None or dk < 2 or dk % 2:
        raise ValueError(
            f"d_key must be an even integer >= 2 (split into two halves), got {d_key!r}"
        )
    if h is None or h < 1:
        raise ValueError(f"heads must be an integer >= 1, got {heads!r}")
    return s


def normalize_queries(bn: nn.BatchNorm1d | None, q_TC: Tensor, mask_T: Tensor | None) -> Tensor:
    """Batch-norm the queries (PEER §2, "query batch normalisation") using valid tokens only.

    Padding rows are normalised with the running statistics and never update them.
    """
    if bn is None:
        return q_TC
    if mask_T is None or not bn.training or bool(mask_T.all()):
        return bn(q_TC)
    out = torch.empty_like(q_TC)
    out[mask_T] = bn(q_TC[mask_T])
    out[~mask_T] = F.batch_norm(
        q_TC[~mask_T], bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
    )
    return out


class _HalfTopK(torch.autograd.Function):
    """Top-k of ``q·c`` over one half's S sub-keys, batched over (head, half) pairs.

    Same values/indices as ``torch.bmm(q, keysᵀ).topk(k)`` but the backward only touches the k
    selected sub-keys per row (:func:`subkey_grads`: O(T·k·d) instead of two dense O(T·S·d)
    matmuls and a dense ``[B, T, S]`` zero-filled score gradient), unless half or more of each
    row is selected, where the dense form is the faster one. Gradients are not
    materialised: autograd would otherwise zero-fill a ``[B, T, k]`` gradient for the index
    output in every backward, only for it to be ignored.
    """

    @staticmethod
    def forward(ctx, q_BTd, keys_BSd, k):  # noqa: ANN001, ANN205
        scores_BTS = torch.bmm(q_BTd, keys_BSd.transpose(1, 2))
        top_v, top_i = topk_last_dim(scores_BTS, k)
        ctx.save_for_backward(q_BTd, keys_BSd, top_i)
        ctx.mark_non_differentiable(top_i)
        ctx.set_materialize_grads(False)
        return top_v, top_i

    @staticmethod
    def backward(ctx, g_BTk, _g_idx):  # noqa: ANN001, ANN205
        if g_BTk is None:
            return None, None, None
        q_BTd, keys_BSd, top_i = ctx.saved_tensors
        want_q, want_keys = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_q, g_keys = subkey_grads(q_BTd, keys_BSd, top_i, g_BTk, want_q, want_keys)
        return None if g_q is None else g_q.to(q_BTd.dtype), g_keys, None


class _PairScores(torch.autograd.Function):
    """``v[h,0,t,a] + v[h,1,t,b]`` for the selected grid positions ``(a, b)`` ``[H, T, k]``.

    The same sums as two ``gather`` calls of the two halves' top-k values, but the backward
    zero-fills one ``[H, 2, T, k]`` gradient and scatters into it, where autograd's gather and
    select backwards zero-filled four buffers (two of them the full ``[H, 2, T, k]``).
    """

    @staticmethod
    def forward(ctx, top_v_H2TK, a_HTK, b_HTK):  # noqa: ANN001, ANN205
        ctx.save_for_backward(a_HTK, b_HTK)
        return top_v_H2TK[:, 0].gather(-1, a_HTK) + top_v_H2TK[:, 1].gather(-1, b_HTK)

    @staticmethod
    def backward(ctx, g_HTK):  # noqa: ANN001, ANN205
        a_HTK, b_HTK = ctx.saved_tensors
        H, T, K = g_HTK.shape
        g = g_HTK.new_zeros(H, 2, T, K)
        g[:, 0].scatter_add_(-1, a_HTK, g_HTK)
        g[:, 1].scatter_add_(-1, b_HTK, g_HTK)
        return g, None, None


CANDIDATES = ("staircase", "grid")

_PAIRS: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}


def staircase_pairs(k: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """The grid positions ``(a, b)`` (0-based) with ``(a+1)·(b+1) <= k``, in grid order (a-major).

    Both halves' top-k lists are sorted, so the candidate at 1-based grid position (a, b) scores
    no higher than the a·b candidates (a' <= a, b' <= b), each of which also comes earlier in grid
    order (so wins a tie): with a·b > k it can never be among the top k. The Σ_a ⌊k/a⌋ pairs left
    (≈ k·ln k: 50 of 256 at k = 16, 140 of 1,296 at k = 36) hold the exact top-k. Cached per
    (k, device): built once, never per call; callers must not modify the returned tensors.
    """
    key = (int(k), torch.device(device))
    if key not in _PAIRS:
        ab = [(a, b) for a in range(k) for b in range(k // (a + 1))]
        pairs = torch.tensor(ab, dtype=torch.int64, device=key[1]).reshape(-1, 2)
        _PAIRS[key] = (pairs[:, 0].contiguous(), pairs[:, 1].contiguous())
    return _PAIRS[key]


def product_key_topk(
    q_THK: Tensor, sub_keys: Tensor, top_k: int, candidates: str = "staircase"
) -> tuple[Tensor, Tensor]:
    """Exact top-k of ``q·key_n`` over the N = S² product keys ``key_{i·S+j} = [c_i ; c'_j]``.

    Lample et al. 2019, §3.2 (used unchanged by PEER): split the query into halves ``q1, q2``;
    take the top-k of ``q1·C`` and of ``q2·C'``; the top-k of all N sums lies among the k×k sums of
    those candidates. Grid positions ``(a, b)`` of the second top-k are mapped back to sub-key ids
    and then to the expert id ``i·S + j`` (returning the grid position ``a·k + b`` instead still
    yields ids in range, so the mistake is silent: the layer would read the wrong rows).

    ``candidates``:

    * ``"staircase"`` (default): score only the Σ_a ⌊k/a⌋ pairs of :func:`staircase_pairs` (the
      others can never win), the second top-k in a fused kernel. Ties: the lower grid position
      wins (higher first-half score, then lower first-half sub-key id, then the same for the second
      half), the rule under which the pruning is exact; the half top-k also lets the lower sub-key
      id win. The result is then the top-k of all N keys ordered by (score, first-half score,
      -i, second-half score, -j), which the tests check by brute force.
    * ``"grid"``: all k² sums and ``torch.topk`` (the original path, kept as the reference and for
      ``moelab bench peer``). Same result except on exact ties, which ``torch.topk`` breaks in an
      unspecified order (on an all-equal 4×4 grid it returns positions 10, 11, 12, 9).

    The returned scores are differentiable w.r.t. queries and keys; the backward reaches only the
    half top-k entries of the selected pairs (both paths touch the same sub-keys).

    Args:
        q_THK: queries ``[T, H, d_key]`` (d_key here is the full key size).
        sub_keys: ``[Hk, 2, S, d_key/2]`` with ``Hk`` = 1 (keys shared by heads, PEER) or H (PKM).
        top_k: k.
        candidates: ``"staircase"`` or ``"grid"``.

    Returns:
        ``scores_THK`` and long ``idx_THK`` in ``[0, S²)``, both sorted by descending score.
    """
    if candidates not in CANDIDATES:
        raise ValueError(f"candidates must be one of {CANDIDATES}, got {candidates!r}")
    top_v, top_i = half_topk(q_THK, sub_keys, top_k)
    return combine_halves(top_v, top_i, sub_keys.shape[-2], candidates)


def half_topk(q_THK: Tensor, sub_keys: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """First stage of :func:`product_key_topk`: each (head, half)'s top-k sub-key scores and ids,
    ``[H, 2, T, k]`` each, sorted descending (scores differentiable)."""
    T, H, _ = q_THK.shape
    S, half = sub_keys.shape[-2], sub_keys.shape[-1]
    keys = sub_keys.expand(H, 2, S, half) if sub_keys.shape[0] == 1 else sub_keys
    q_BTd = q_THK.view(T, H * 2, half).transpose(0, 1)  # B = (head, half) pairs
    top_v, top_i = _HalfTopK.apply(q_BTd, keys.reshape(H * 2, S, half), top_k)  # [B, T, k]
    return top_v.view(H, 2, T, top_k), top_i.view(H, 2, T, top_k)


def combine_halves(
    top_v: Tensor, top_i: Tensor, S: int, candidates: str = "staircase"
) -> tuple[Tensor, Tensor]:
    """Second stage of :func:`product_key_topk`: score the candidate pairs of the two halves'
    lists ``[H, 2, T, k]`` and keep the top k; returns ``scores_THK`` and ids ``i·S + j``."""
    H, _, T, top_k = top_v.shape
    if candidates == "grid":
        cand_HTKK = top_v[:, 0, :, :, None] + top_v[:, 1, :, None, :]  # [H, T, k, k]
        best_v, pos = cand_HTKK.flatten(-2).topk(top_k, dim=-1)  # grid positions in [0, k²)
        if best_v.numel() and bool(best_v.detach().isnan().any()):  # inf + (-inf) of the halves
            raise _nan_error(int(best_v.detach().isnan().any(-1).sum()), H * T)
        a, b = pos // top_k, pos % top_k
    else:
        pa, pb = staircase_pairs(top_k, top_v.device)
        v = top_v.detach()
        # [H, T, k] grid positions and expert ids i·S + j of the best listed pairs
        a, b, idx = select_pairs(v[:, 0], v[:, 1], top_i[:, 0], top_i[:, 1], pa, pb, top_k, S)
        # the same IEEE sums the kernel ranked, now with a gradient to the two half entries
        best_v = _PairScores.apply(top_v, a, b)
        return best_v.permute(1, 0, 2), idx.permute(1, 0, 2)
    i = top_i[:, 0].gather(-1, a)
    j = top_i[:, 1].gather(-1, b)
    idx = i * S + j
    return best_v.permute(1, 0, 2), idx.permute(1, 0, 2)


def duplicated_retrievals(idx_THK: Tensor) -> Tensor:
    """Per token, retrievals (over all heads) that repeat an expert already retrieved by another
    head (within one head the k ids are distinct). Returns long ``[T]``."""
    T, H, K = idx_THK.shape
    s = idx_THK.reshape(T, H * K).sort(dim=-1).values  # explicit width: T may be 0
    return (s[:, 1:] == s[:, :-1]).sum(-1)
