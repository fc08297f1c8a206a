"""``transformers`` MoE models into moelab, and their TopK routing into another router's.

:func:`convert` takes a ``transformers`` Mixtral, OLMoE, Qwen2-MoE or Qwen3-MoE causal LM (or one of
their sparse MoE blocks) and returns the moelab :class:`~moelab.model.TransformerLM` (or
:class:`~moelab.layers.MoE`) with the same weights and the same outputs. How each family's routing
maps onto moelab's TopK router (all four take the softmax over all E logits, then the top k):

============  ==============================  ==============================================
family        routing weights                 moelab
============  ==============================  ==============================================
Mixtral       top-k probabilities, rescaled   ``router=topk, renormalize=True``
              to sum to 1
OLMoE         ``norm_topk_prob`` (default     ``renormalize=norm_topk_prob``; attention
              False: raw probabilities)       ``qk_norm=full`` (RMSNorm over the projection)
Qwen2-MoE     ``norm_topk_prob``; shared      ``renormalize=norm_topk_prob``; ``shared_experts
              expert scaled by                = shared width / expert width``,
              ``sigmoid(x·w)``                ``shared_gate=True``; ``qkv_bias=True``; dense
                                              blocks from ``mlp_only_layers`` /
                                              ``decoder_sparse_step`` as ``ffn_layers``
Qwen3-MoE     ``norm_topk_prob``              as Qwen2-MoE without shared expert or biases;
                                              ``qk_norm=head``, ``head_size=head_dim``
============  ==============================  ==============================================

:func:`switch_router` (``convert(..., router=NAME)``) then replaces every TopK router by another
router for continued training: any router that declares ``convertible`` (it takes over the TopK
gate's rows through its own :meth:`~moelab.layers.routers.Router.load_gate`); any other is refused
before any work. ReMoE's ReLU router (:func:`switch_to_relu`) is the case the paper studies: the
router weight is the old gate's, ``top_k`` stays, so the λ controller's target is ``1 − k/E``. A
switch changes the function (ReLU outputs are not the softmax weights, and tokens get a variable
number of experts); the model has to adapt during the continued training, which is the ReMoE
paper's plug-and-play claim to test.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moelab.hf.switch import check_switch_target, switch_router
from moelab.hf.switch import switch_to_relu as switch_to_relu  # the public name, kept here
from moelab.layers.moe import MoE
from moelab.model import ModelConfig, TransformerLM

# model_type of the config -> what differs between the families (see the module docstring)
FAMILIES = {
    "mixtral": "Mixtral (MixtralForCausalLM)",
    "olmoe": "OLMoE (OlmoeForCausalLM)",
    "qwen2_moe": "Qwen2-MoE (Qwen2MoeForCausalLM)",
    "qwen3_moe": "Qwen3-MoE (Qwen3MoeForCausalLM)",
}
BLOCKS = {
    "MixtralSparseMoeBlock": "mixtral",
    "OlmoeSparseMoeBlock": "olmoe",
    "Qwen2MoeSparseMoeBlock": "qwen2_moe",
    "Qwen3MoeSparseMoeBlock": "qwen3_moe",
}
# dense families (no experts): converted to moelab dense models, to upcycle (moelab.hf.upcycle)
DENSE_FAMILIES = {
    "llama": "Llama (LlamaForCausalLM)",
    "mistral": "Mistral (MistralForCausalLM)",
    "qwen2": "Qwen2 (Qwen2ForCausalLM)",
}
SUPPORTED = (
    ", ".join(FAMILIES.values())
    + ", one of their sparse MoE blocks ("
    + ", ".join(BLOCKS)
    + "), or the dense "
    + ", ".join(DENSE_FAMILIES.values())
)


def convert(model: nn.Module, router: str | None = None) -> nn.Module:
    """A ``transformers`` MoE causal LM → :class:`TransformerLM`, or one of its sparse MoE blocks
    → :class:`MoE`, computing the same function in float32 (``router=None``, or the TopK router
    it has), or switched to another router (see :func:`switch_router`)."""
    if router is not None:
        check_switch_target(router)
    if type(model).__name__ in BLOCKS:
        out: nn.Module = convert_block(model)
    else:
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in FAMILIES | DENSE_FAMILIES or not hasattr(model, "lm_head"):
            name = type(model).__name__
            kind = f" (model_type {model_type!r})" if model_type else ""
            raise ValueError(f"cannot convert {name}{kind}: supported are {SUPPORTED}")
        if model_type in DENSE_FAMILIES and router is not None:
            raise ValueError(
                f"router: {model_type} is a dense model with no router to switch; upcycle it "
                f"into an MoE first (moelab.hf.upcycle(..., router={router!r}))"
            )
        out = convert_model(model)
    return out if router is None else switch_router(out, router)


# ---------------------------------------------------------------------------------- config


def _get(config: Any, name: str, default: Any = None) -> Any:
    value = getattr(config, name, default)
    return default if value is None else value


def rope_base(config: Any) -> float:
    """RoPE base of a ``transformers`` config (``rope_parameters`` in v5, ``rope_theta`` before);
    only the plain (unscaled) RoPE moelab computes is accepted."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ValueError(
            f"{config.model_type}: rope_scaling type {kind!r} is not supported (moelab computes "
            "plain RoPE); supported: default"
        )
    return float(params.get("rope_theta") or _get(config, "rope_theta", 10000.0))


def sparse_layers(config: Any) -> list[int]:
    """Blocks whose FFN is the sparse MoE block (Qwen: ``mlp_only_layers``,
    ``decoder_sparse_step``)."""
    n = config.num_hidden_layers
    dense = set(_get(config, "mlp_only_layers", []))
    step = _get(config, "decoder_sparse_step", 1)
    return [i for i in range(n) if i not in dense and (i + 1) % step == 0]


def model_config(config: Any, model: nn.Module | None = None) -> ModelConfig:
    """The moelab :class:`ModelConfig` of a Mixtral / OLMoE / Qwen2-MoE / Qwen3-MoE config (or of a
    dense Llama / Mistral / Qwen2 one)."""
    family = config.model_type
    if family not in FAMILIES | DENSE_FAMILIES:
        raise ValueError(f"model_type {family!r} is not supported; supported: {SUPPORTED}")
    act = _get(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{family}: hidden_act {act!r} is not supported; supported: silu")
    if _get(config, "clip_qkv") is not None:
        raise ValueError(f"{family}: clip_qkv is not supported (moelab does not clip); use null")
    if family in ("olmoe", "qwen3_moe", "llama", "mistral") and _get(
        config, "attention_bias", False
    ):
        raise ValueError(
            f"{family}: attention_bias=true is not supported (moelab has biases on q/k/v only)"
        )
    if _get(config, "mlp_bias", False):
        raise ValueError(f"{family}: mlp_bias=true is not supported (moelab FFNs have no biases)")
    d_model, n_heads = config.hidden_size, config.num_attention_heads
    head_dim = _get(config, "head_dim", d_model // n_heads)
    max_len = config.max_position_embeddings
    window = _get(config, "sliding_window")
    if window and (family in ("mixtral", "mistral") or _get(config, "use_sliding_window", False)):
        max_len = min(max_len, window)  # identical up to the window; moelab has no sliding one

    if family in DENSE_FAMILIES:
        return _config(
            config,
            model,
            {"kind": "dense", "d_hidden": config.intermediate_size},
            list(range(config.num_hidden_layers)),
            head_dim,
            max_len,
        )
    E, k = _get(config, "num_local_experts") or config.num_experts, config.num_experts_per_tok
    expert_width = _get(config, "moe_intermediate_size") or config.intermediate_size
    ffn: dict[str, Any] = {
        "kind": "moe",
        "router": "topk",
        "num_experts": E,
        "top_k": k,
        "d_hidden": expert_width,
        "renormalize": family == "mixtral" or bool(_get(config, "norm_topk_prob", False)),
        "balance_coef": float(_get(config, "router_aux_loss_coef", 0.01)),
    }
    if family == "qwen2_moe":
        shared = config.shared_expert_intermediate_size
        if shared % expert_width:
            raise ValueError(
                f"qwen2_moe: shared_expert_intermediate_size ({shared}) must be a multiple of "
                f"moe_intermediate_size ({expert_width}): moelab's shared experts have the "
                "routed experts' width"
            )
        ffn |= {"shared_experts": shared // expert_width, "shared_gate": True}
    return _config(config, model, ffn, sparse_layers(config), head_dim, max_len)


def _config(
    config: Any,
    model: nn.Module | None,
    ffn: dict[str, Any],
    sparse: list[int],
    head_dim: int,
    max_len: int,
) -> ModelConfig:
    family, d_model, n_heads = config.model_type, config.hidden_size, config.num_attention_heads
    qkv_bias = family in ("qwen2_moe", "qwen2")
    if model is not None:  # transformers 4.x Qwen2-MoE has q/k/v biases whatever its config says
        qkv_bias = _layers(model)[0].self_attn.q_proj.bias is not None
    return ModelConfig(
        vocab_size=config.vocab_size,
        d_model=d_model,
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=_get(config, "num_key_value_heads", n_heads),
        max_seq_len=max_len,
        rope_base=rope_base(config),
        norm_eps=float(config.rms_norm_eps),
        tie_embeddings=bool(_get(config, "tie_word_embeddings", False)),
        init_std=float(_get(config, "initializer_range", 0.02)),
        ffn=ffn,
        ffn_layers="all" if len(sparse) == config.num_hidden_layers else sparse,
        dense_d_hidden=config.intermediate_size if len(sparse) < config.num_hidden_layers else None,
        qkv_bias=qkv_bias,
        qk_norm={"olmoe": "full", "qwen3_moe": "head"}.get(family, "none"),
        head_size=None if head_dim * n_heads == d_model else head_dim,
    )


# --------------------------------------------------------------------------------- weights


def _layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def _t(x: Tensor) -> Tensor:
    return x.detach().to(torch.float32)


def _dense_weights(mlp: nn.Module) -> tuple[Tensor, Tensor]:
    """``(w13_DF2, w2_FD)`` of a gate/up/down (or Mixtral w1/w3/w2) SwiGLU MLP."""
    if hasattr(mlp, "gate_proj"):
        gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    else:
        gate, up, down = mlp.w1, mlp.w3, mlp.w2
    return torch.cat([_t(gate.weight).T, _t(up.weight).T], dim=1), _t(down.weight).T


def expert_weights(experts: nn.Module) -> tuple[Tensor, Tensor]:
    """``(w13_EDF2, w2_EFD)`` from fused 3-D experts (transformers 5) or a list of MLPs (4.x)."""
    if isinstance(experts, nn.ModuleList):
        pairs = [_dense_weights(e) for e in experts]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    if hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj"):
        gate_up, down = _t(experts.gate_up_proj), _t(experts.down_proj)
        if getattr(experts, "is_transposed", False):  # already [E, D, 2F] / [E, F, D]
            return gate_up.contiguous(), down.contiguous()
        return gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
    raise ValueError(
        f"experts module {type(experts).__name__} has neither gate_up_proj/down_proj nor a list "
        "of expert MLPs; supported: transformers' fused experts or expert lists"
    )


def block_state(block: nn.Module) -> dict[str, Tensor]:
    """moelab :class:`MoE` state dict of a sparse MoE block."""
    w13, w2 = expert_weights(block.experts)
    state = {"router.weight": _t(block.gate.weight), "experts.w13_EDF2": w13, "experts.w2_EFD": w2}
    if getattr(block, "shared_expert", None) is not None:
        state["shared.w13_DF2"], state["shared.w2_FD"] = _dense_weights(block.shared_expert)
        state["shared_gate.weight"] = _t(block.shared_expert_gate.weight)
    return state


def convert_block(block: nn.Module) -> MoE:
    """A sparse MoE block of one of the supported families as a moelab :class:`MoE`."""
    family = BLOCKS[type(block).__name__]
    w13, _ = expert_weights(block.experts)
    E, D, F2 = w13.shape
    gate = block.gate
    k = getattr(gate, "top_k", None) or block.top_k
    norm = getattr(gate, "norm_topk_prob", getattr(block, "norm_topk_prob", False))
    shared = getattr(block, "shared_expert", None)
    shared_experts = 0
    if shared is not None:
        width = _dense_weights(shared)[1].shape[0]
        if width % (F2 // 2):
            raise ValueError(
                f"{type(block).__name__}: shared expert width {width} is not a multiple of the "
                f"expert width {F2 // 2}"
            )
        shared_experts = width // (F2 // 2)
    moe = MoE(
        D,
        F2 // 2,
        E,
        k,
        router="topk",
        renormalize=family == "mixtral" or bool(norm),
        shared_experts=shared_experts,
        shared_gate=shared is not None,
    )
    moe.load_state_dict(block_state(block))
    return moe.to(torch.float32)


def convert_model(model: nn.Module) -> TransformerLM:
    """A supported ``transformers`` MoE causal LM as a moelab :class:`TransformerLM`."""
    cfg = model_config(model.config, model)
    state: dict[str, Tensor] = {
        "tok_emb.weight": _t(model.model.embed_tokens.weight),
        "norm.weight": _t(model.model.norm.weight),
        "lm_head.weight": _t(model.lm_head.weight),
    }
    for i, layer in enumerate(_layers(model)):
        p = f"blocks.{i}."
        attn = layer.self_attn
        for ours, theirs in (
            ("wq", "q_proj"),
            ("wk", "k_proj"),
            ("wv", "v_proj"),
            ("wo", "o_proj"),
        ):
            lin = getattr(attn, theirs)
            state[f"{p}attn.{ours}.weight"] = _t(lin.weight)
            if ours != "wo" and cfg.qkv_bias:
                state[f"{p}attn.{ours}.bias"] = _t(lin.bias)
        if cfg.qk_norm != "none":
            state[f"{p}attn.q_norm.weight"] = _t(attn.q_norm.weight)
            state[f"{p}attn.k_norm.weight"] = _t(attn.k_norm.weight)
        state[f"{p}attn_norm.weight"] = _t(layer.input_layernorm.weight)
        state[f"{p}ffn_norm.weight"] = _t(layer.post_attention_layernorm.weight)
        mlp = getattr(layer, "mlp", None) or layer.block_sparse_moe  # Mixtral 4.x
        if type(mlp).__name__ in BLOCKS:
            state |= {f"{p}ffn.{k}": v for k, v in block_state(mlp).items()}
        else:
            w13, w2 = _dense_weights(mlp)
            state[f"{p}ffn.w13_DF2"], state[f"{p}ffn.w2_FD"] = w13, w2
    moelab_model = TransformerLM(cfg)
    moelab_model.load_state_dict(state)
    return moelab_model.eval()
