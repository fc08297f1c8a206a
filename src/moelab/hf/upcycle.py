"""Sparse upcycling: a dense moelab model becomes an MoE whose experts start as copies of its FFN.

Komatsuzaki et al. 2023 ("Sparse Upcycling") copy each dense FFN into E experts and add a new
router; He et al. 2024 ("Upcycling Large Language Models into Mixture of Experts") extend it to
fine-grained experts with *virtual groups* and *weight scaling*, which moelab follows:

* each of the E copies is split along its hidden units into G experts of width ``F/G`` (the
  copy's hidden units ``[j·F/G, (j+1)·F/G)`` for expert ``c·G + j``); summed, the G parts of one
  copy are the dense FFN again;
* the router gets E random rows, each repeated for the G experts of its copy, so a copy's G parts
  always have equal logits and TopK selects whole copies (``k·G`` experts = k copies) - each
  router does this itself (:meth:`~moelab.layers.routers.Router.upcycle_init`); any router that
  declares ``upcyclable`` can be the new one, any other is refused before any work;
* the parts' down projections are multiplied by G, which cancels the ``1/G`` that renormalising
  the ``k·G`` selected weights gives each part.

Where the result equals the dense model at step 0 (tested):

* ``router="topk"`` with ``renormalize=True`` (the default here), no noise: **exact** for every G
  (the selected weights sum to 1 and every selected copy computes the dense FFN; with G > 1 up
  to float rounding of the split sums). A copy's parts have equal logits, so the ``k·G`` largest
  are always k whole copies (unless two copies' random router rows give exactly equal logits).
* ``renormalize=False``: the output is the dense FFN scaled by the token's selected probability
  mass (``k/E`` on average), not equal.
* ``router="relu"``: the output is the dense FFN scaled by the token's total gate
  ``Σ_e ReLU(x·w_e)`` (zero for a token with no positive router output): not equal; the λ
  controller and training adapt it, as when training ReMoE from scratch.
* the other routers: a start, not the dense function (a softmax over all experts weights the
  selected copies by their probability mass; hash routing gives a token ``k·G`` parts of different
  copies, each with weight 1; Lory merges the parts of all copies); training adapts it.
* ``noise_std > 0``: each copy gets independent ``N(0, noise_std²)`` noise (breaking the copies'
  symmetry, as in noisy upcycling): close to, not equal to, the dense model.
"""

from __future__ import annotations

import torch

from moelab.config import ConfigError
from moelab.layers.dense import DenseFFN
from moelab.layers.moe import MoE
from moelab.layers.routers import require, router_options
from moelab.model import ModelConfig, TransformerLM
from moelab.model.ffn_configs import DenseConfig


def upcycled_config(
    cfg: ModelConfig,
    num_experts: int,
    top_k: int,
    granularity: int = 1,
    router: str = "topk",
    renormalize: bool = True,
) -> ModelConfig:
    """The MoE config an upcycled dense config becomes (same widths, blocks and activation)."""
    if not isinstance(cfg.ffn, DenseConfig):
        raise ValueError(
            f"model.ffn.kind: upcycling needs a dense model, got kind {cfg.ffn.kind!r}; "
            "supported: dense"
        )
    try:
        require(router, "upcyclable")
    except ValueError as err:
        raise ValueError(f"router: {err}") from None
    d_hidden = cfg.ffn.resolved(cfg.d_model).d_hidden
    ffn = {
        "kind": "moe",
        "router": router,
        "num_experts": num_experts,
        "top_k": top_k,
        "granularity": granularity,
        "d_hidden": d_hidden,
        "activation": cfg.ffn.activation,
    }
    if "renormalize" in router_options(router):  # routers whose softmax gates can be renormalised
        ffn["renormalize"] = renormalize
    try:
        return ModelConfig.from_dict(cfg.to_dict() | {"ffn": ffn})
    except ConfigError as err:  # "ffn.granularity: must divide d_hidden (64), got 3"
        field = err.field.removeprefix("ffn.")
        raise ValueError(f"upcycle: {field}: {err.message}") from None


@torch.no_grad()
def upcycle_ffn(
    dense: DenseFFN, moe: MoE, noise_std: float = 0.0, generator: torch.Generator | None = None
) -> None:
    """Fill ``moe`` (built from :func:`upcycled_config`) from ``dense``: split copies, scaled down
    projections, and the router's own start for copies split into G parts (virtual groups); see
    the module docstring."""
    G, EG = moe.granularity, moe.num_experts
    E, F, Fg = EG // G, dense.d_hidden, moe.expert_hidden
    w13, w2 = dense.w13_DF2, dense.w2_FD
    swiglu = dense.activation == "swiglu"
    for c in range(E):
        for j in range(G):
            cols = slice(j * Fg, (j + 1) * Fg)
            part13 = (
                torch.cat([w13[:, cols], w13[:, F + j * Fg : F + (j + 1) * Fg]], dim=1)
                if swiglu
                else w13[:, cols]
            )
            part2 = w2[cols] * G
            if noise_std > 0:
                part13 = part13 + noise_std * torch.randn(part13.shape, generator=generator)
                part2 = part2 + noise_std * torch.randn(part2.shape, generator=generator)
            moe.experts.w13_EDF2[c * G + j].copy_(part13)
            moe.experts.w2_EFD[c * G + j].copy_(part2)
    for router in (moe.router, *moe.chain_routers):
        router.upcycle_init(G)


def upcycle(
    dense_model: TransformerLM,
    num_experts: int,
    top_k: int,
    granularity: int = 1,
    noise_std: float = 0.0,
    router: str = "topk",
    *,
    renormalize: bool = True,
    seed: int = 0,
) -> TransformerLM:
    """A dense :class:`TransformerLM` as an MoE of ``num_experts`` copies of each FFN (split into
    ``granularity`` fine-grained experts), ``top_k`` routed per token, a new ``router`` (any
    that declares ``upcyclable``; ``renormalize`` for those that take it). Attention, norms and
    embeddings are copied; the router is drawn with ``seed``. See the module docstring for where
    the result equals the dense model."""
    if not isinstance(dense_model, TransformerLM):
        raise ValueError(
            f"upcycle expects a moelab TransformerLM, got {type(dense_model).__name__}; convert a "
            "transformers Llama with moelab.hf.convert first"
        )
    if not noise_std >= 0:
        raise ValueError(f"noise_std: must be >= 0, got {noise_std}")
    cfg = upcycled_config(
        dense_model.cfg, num_experts, top_k, granularity, router, renormalize=renormalize
    )
    generator = torch.Generator().manual_seed(seed)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        moe_model = TransformerLM(cfg)
    finally:
        torch.random.set_rng_state(state)
    dense_state = dense_model.state_dict()
    kept = {
        name: t
        for name, t in dense_state.items()
        if not any(name.startswith(f"blocks.{i}.ffn.") for i in cfg.ffn_layer_indices())
    }
    missing = moe_model.load_state_dict(kept, strict=False).missing_keys
    for i in cfg.ffn_layer_indices():
        upcycle_ffn(dense_model.blocks[i].ffn, moe_model.blocks[i].ffn, noise_std, generator)
    outside_ffns = [n for n in missing if ".ffn." not in n]
    if outside_ffns:  # only the upcycled FFNs may be new
        raise ValueError(f"upcycle: parameters with no dense counterpart: {outside_ffns}")
    return moe_model.train(dense_model.training)
