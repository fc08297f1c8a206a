"""A single-token decode step of moelab's own, for :func:`~moelab.model.generate`.

A decode step of the tiny models moelab trains costs Python and dispatch overhead, not FLOPs:
the general forward (:class:`~moelab.model.TransformerLM`) builds masks, slices RoPE tables and
routes through the permute → grouped experts → combine pipeline that is built for thousands of
rows. With one new token per row (``B`` rows, ``B`` small) the step below does the same
arithmetic with less around it:

* RoPE angles and the padding mask of the step are made once and shared by every layer;
* queries, keys and values come from one matmul of the concatenated ``wq | wk | wv`` (made once);
* keys and values are written into the cache at one position, attention reads the filled prefix;
* a plain MoE layer routes as usual (its own router, so every router decides as it does in the
  model) and then runs each *chosen* expert on its rows with one matmul pair, weighted by the
  gates and summed per row — no grouped GEMM call (whose fixed cost dominates a few rows);
  a dispatcher with a ``decode_rows(x_TD, decision, context)`` method (the offloading one,
  :mod:`moelab.serve.hook`) supplies the experts' weights to the same arithmetic itself;
* RMSNorm is one fused ``F.rms_norm`` call (float32: the same bits as the module's formula);
* the LM head reads a transposed copy of its weight (``[D, V]``, made once per generation when
  at least :data:`HEAD_COPY_MIN_STEPS` steps remain): ``x @ W^T`` on the contiguous copy is
  faster on CPU than ``F.linear`` on the ``[V, D]`` weight, most at batch 1;
* the step runs in inference mode (no autograd bookkeeping on any op).

Anything else (a dense FFN, PEER / PKM, Chain-of-Experts, merged / quantized / compressed expert
banks, an expert-parallel dispatcher, an observer, attention with biases or q/k norms) runs
through its own module, so the step is exact wherever it is used; :func:`model_decodes_fast`
says whether any layer uses the short path at all. The result equals the model's forward up to
float rounding (summation order of the experts' outputs): the tests compare greedy tokens with
the general path for every causal router.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.layers import dispatch
from moelab.layers.base import RoutingContext, RoutingDecision
from moelab.layers.dense import activate
from moelab.layers.experts import GroupedExperts
from moelab.layers.moe import MoE
from moelab.model.transformer import Attention, KVCache, RMSNorm, TransformerLM


def _plain_moe(ffn: torch.nn.Module) -> bool:
    """A MoE layer whose output is ``Σ_e gate·expert_e(x)`` (+ direct and shared outputs)."""
    return (
        type(ffn) is MoE
        and not ffn.merges_experts
        and not ffn.chain_routers
        and ffn.momentum == 0
        and ffn.momentum_step == 1.0
        and ffn.expert_slot is None
        and not ffn.debug_uniform_routing
        and type(ffn.experts) is GroupedExperts
        and (
            type(ffn.dispatcher) is dispatch.LocalDispatcher
            or hasattr(ffn.dispatcher, "decode_rows")
        )
    )


def _plain_attention(attn: Attention) -> bool:
    return attn.qk_norm == "none" and attn.wq.bias is None


HEAD_COPY_MIN_STEPS = 8
"""Steps left in the cache from which :class:`FastStep` copies the LM head transposed: the copy
reads and writes the head once, about what two steps' head matmuls read."""


def _rms_norm(norm: RMSNorm, x: Tensor) -> Tensor:
    """:class:`RMSNorm`'s formula in one fused call when ``x`` is float32 already (no float32
    round trip: one dispatch instead of six; the tests check equal bits with the module)."""
    if x.dtype != torch.float32 or norm.weight.dtype != torch.float32:
        return norm(x)
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)


def model_decodes_fast(model: TransformerLM) -> bool:
    """Whether :class:`FastStep` shortens any layer of ``model`` (else it is no faster)."""
    return any(_plain_moe(b.ffn) or _plain_attention(b.attn) for b in model.blocks)


class FastStep:
    """One new token per row on ``model``'s :class:`KVCache`, with the short paths above.

    Built after the prefill (the cache holds the prompt); ``__call__(next_B)`` returns the logits
    ``[B, V]`` and advances the cache, as ``model(next_B[:, None], kv_cache=cache)[:, -1]``.
    """

    def __init__(self, model: TransformerLM, cache: KVCache) -> None:
        self.model, self.cache = model, cache
        cos, sin = model._rope_tables(model.tok_emb.weight.device)
        # full-width tables for rotating q and k in one go: x·cos2 + swap(x)·sin2 with
        # swap(x) = (x2, x1) and sin2 = (−sin, sin) is apply_rope's x1·cos − x2·sin, x2·cos + x1·sin
        self.cos2 = torch.cat([cos, cos], dim=-1)
        self.sin2 = torch.cat([-sin, sin], dim=-1)
        self.half = cos.shape[-1]
        self.attn_fast = [_plain_attention(b.attn) for b in model.blocks]
        self.moe_fast = [_plain_moe(b.ffn) for b in model.blocks]
        # wq | wk | wv as one [D, q + 2·kv] matrix per layer (copied once per generation)
        self.wqkv = [
            torch.cat([b.attn.wq.weight, b.attn.wk.weight, b.attn.wv.weight]).t().contiguous()
            if fast
            else None
            for b, fast in zip(model.blocks, self.attn_fast, strict=True)
        ]
        head = model.lm_head
        self.head_DV: Tensor | None = None
        steps_left = cache.max_len - cache.length
        if (
            type(head) is torch.nn.Linear
            and head.bias is None
            and steps_left >= HEAD_COPY_MIN_STEPS
        ):
            self.head_DV = head.weight.t().contiguous()

    @torch.inference_mode()
    def __call__(self, next_B: Tensor) -> Tensor:
        model, cache = self.model, self.cache
        pos = cache.length
        if pos + 1 > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions, asked for {pos + 1}")
        x_BD = model.tok_emb(next_B)
        if cache.pad_B is None:  # every row at the same position
            cos, sin = self.cos2[pos : pos + 1], self.sin2[pos : pos + 1]
            key_mask = None
        else:  # each row's own position; padded keys masked out
            rows_B = (pos - cache.pad_B).clamp_min(0)
            cos, sin = self.cos2[rows_B][:, None], self.sin2[rows_B][:, None]
            key_mask = cache._key_valid_BP[:, None, None, : pos + 1]
        x_B1D = x_BD[:, None]
        context = RoutingContext(token_ids=next_B[:, None])
        for i, block in enumerate(model.blocks):
            h_B1D = _rms_norm(block.attn_norm, x_B1D)
            if self.attn_fast[i]:
                a_B1D = self._attention(i, block.attn, h_B1D, cos, sin, key_mask)
            else:  # the cache's own mask and update; the same cos / sin shapes as the model's
                half = self.half
                c, s = cos[..., :half], sin[..., half:]
                if key_mask is not None:
                    c, s = c[:, None], s[:, None]
                a_B1D = block.attn(h_B1D, c, s, cache)
            x_B1D = x_B1D + a_B1D
            h_B1D = _rms_norm(block.ffn_norm, x_B1D)
            ffn = block.ffn
            if self.moe_fast[i] and not ffn.should_record() and ffn.routing_observer is None:
                x_B1D = x_B1D + self._moe(block.ffn, h_B1D, context)
            else:
                x_B1D = x_B1D + block.ffn(h_B1D, token_mask=None, context=context)
            context = context.next_layer()
        cache.length = pos + 1
        h_BD = _rms_norm(model.norm, x_B1D[:, 0])
        return model.lm_head(h_BD) if self.head_DV is None else h_BD @ self.head_DV

    def _attention(
        self,
        i: int,
        attn: Attention,
        h_B1D: Tensor,
        cos: Tensor,
        sin: Tensor,
        key_mask: Tensor | None,
    ) -> Tensor:
        cache, pos = self.cache, self.cache.length
        B = h_B1D.shape[0]
        H, G, Hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
        qkv = h_B1D[:, 0] @ self.wqkv[i]
        qk_BNd = qkv[:, : (H + G) * Hd].view(B, H + G, Hd)  # rotated together
        half = self.half
        swap_BNd = torch.cat([qk_BNd[..., half:], qk_BNd[..., :half]], dim=-1)
        qk_BNd = (qk_BNd * cos + swap_BNd * sin).to(qkv.dtype)  # rotated in >= float32
        q_BH1d = qk_BNd[:, :H, None]
        k_BG1d = qk_BNd[:, H:, None]
        v_BG1d = qkv[:, (H + G) * Hd :].view(B, G, 1, Hd)
        k_all, v_all = cache.k[i], cache.v[i]
        k_all[:, :, pos : pos + 1] = k_BG1d
        v_all[:, :, pos : pos + 1] = v_BG1d
        y_BH1d = F.scaled_dot_product_attention(
            q_BH1d,
            k_all[:, :, : pos + 1],
            v_all[:, :, : pos + 1],
            attn_mask=key_mask,
            enable_gqa=G != H,
        )
        return attn.wo(y_BH1d.reshape(B, 1, H * Hd))

    @staticmethod
    def _moe(moe: MoE, h_B1D: Tensor, context: RoutingContext) -> Tensor:
        """Route as the layer does, then each chosen expert once on its rows
        (:func:`moe_rows`), and the layer's direct and shared outputs. An offloading dispatcher
        (one with ``decode_rows``) fetches the weights itself and runs the same arithmetic."""
        x_TD = h_B1D[:, 0]
        routed = moe.router(x_TD, None, context)
        d = routed.decision
        decode_rows = getattr(moe.dispatcher, "decode_rows", None)
        if decode_rows is not None:
            y_TD = decode_rows(x_TD, d, context)
        else:
            experts = moe.experts
            y_TD = moe_rows(
                x_TD,
                d,
                lambda e, x_nD: expert_rows(x_nD, *experts_of(experts, e), experts.activation),
            )
        if routed.direct_TD is not None:
            y_TD = y_TD + routed.direct_TD.to(y_TD.dtype)
        return moe._add_shared(x_TD, y_TD)[:, None]


def experts_of(experts: GroupedExperts, e: int) -> tuple[Tensor, Tensor]:
    """Expert ``e``'s ``(w13 [D, 2F], w2 [F, D])`` in a :class:`GroupedExperts` bank."""
    return experts.w13_EDF2[e], experts.w2_EFD[e]


def expert_rows(x_nD: Tensor, w13: Tensor, w2: Tensor, activation: str) -> Tensor:
    """One expert on its rows, ungated: ``act(x·w13)·w2`` (a matmul pair)."""
    return activate(x_nD @ w13, activation) @ w2


def moe_rows(
    x_TD: Tensor,
    d: RoutingDecision,
    expert_out: Callable[[int, Tensor], Tensor],
    order: Sequence[int] | None = None,
    done: Callable[[int], None] | None = None,
) -> Tensor:
    """``Σ gate · expert_e(x)`` per row, each chosen expert once on its rows, where
    ``expert_out(e, x_nD)`` is expert ``e``'s ungated output on rows ``x_nD`` (for a loaded
    bank :func:`expert_rows`: one matmul pair, instead of the grouped GEMM call, whose fixed cost
    dominates a few rows). Measured against all experts over all rows in two matmuls (weights
    concatenated), against padded batched matmuls and against each used expert on all rows with
    its gate column (no permutation): none was faster at batch 1, 4 or 16 (E = 8;
    docs/inference.md).

    ``order`` (the chosen experts, each once) is the order the experts are run in, and
    ``done(e)`` is called once ``e``'s rows are computed: an offloading dispatcher runs the
    experts it holds first (or serves one from a low-precision copy) and unpins each after use.
    The outputs are summed in the routing's own order whatever ``order`` is, so the result has
    the same bits as the default order."""
    if x_TD.shape[0] == 1:  # one row: its experts in turn, no permutation
        chosen = d.expert_idx_N.tolist()
        weights = d.weight_N.to(x_TD.dtype)
        outs: dict[int, Tensor] = {}
        for e in chosen if order is None else order:
            outs[e] = expert_out(e, x_TD)
            if done is not None:
                done(e)
        y_TD = None
        for n, e in enumerate(chosen):
            out_TD = outs[e] * weights[n]
            y_TD = out_TD if y_TD is None else y_TD + out_TD
        return torch.zeros_like(x_TD) if y_TD is None else y_TD  # ReLU may choose none
    # rows sorted by expert, each expert on its block, summed back per row
    perm = dispatch.permute(d)
    x_ND = x_TD.index_select(0, perm.token_idx_N)
    blocks = dict(enumerate(x_ND.split(perm.counts)))
    used = [e for e, n in enumerate(perm.counts) if n]
    if not used:
        return torch.zeros_like(x_TD)
    outs = {}
    for e in used if order is None else order:
        outs[e] = expert_out(e, blocks[e])
        if done is not None:
            done(e)
    return dispatch.combine(torch.cat([outs[e] for e in used]), perm)
