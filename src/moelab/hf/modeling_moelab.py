"""A moelab language model for ``transformers`` (``trust_remote_code=True``), self-contained.

``moelab export-hf`` copies this file into the exported directory, next to ``config.json`` and
``model.safetensors``, so that ``AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)`` needs neither moelab nor network access. It is a second, plain-torch
implementation of ``moelab.model.TransformerLM`` (tested to give the same logits and greedy tokens):

    tokens ─► embedding ─► blocks ─► RMSNorm ─► LM head
    block:  x + attention(RMSNorm(x)) (GQA, RoPE "half split", causal),  then  x + ffn(RMSNorm(x))

with one FFN per block described in ``config.block_ffns``: ``dense`` (SwiGLU/GELU/ReLU/SiLU),
``moe`` (``topk`` softmax routing, optionally renormalised or softmax-after-top-k, or ReMoE's
``relu`` routing; fine-grained and shared experts, an optional sigmoid gate on the shared experts,
an optional capacity limit), ``peer`` and ``pkm`` (product-key retrieval). Parameter names are
moelab's under ``model.``, so the weights are moelab's state dict unchanged.

It runs inference (and plain fine-tuning) but computes none of moelab's routing losses, statistics
or the λ controller: train with moelab. Routing is computed densely per expert (a loop over
experts, no custom kernels), which is exact but not fast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # transformers >= 5
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as _BaseConfig

try:
    from transformers.cache_utils import DynamicCache
except ImportError:  # pragma: no cover - very old transformers
    DynamicCache = None

_MAJOR = int(__import__("transformers").__version__.split(".")[0])
# transformers 5 renamed the cache argument and output field ``past_key_values`` to ``cache``
_CACHE_FIELD = (
    "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else ("past_key_values")
)


class MoelabConfig(_BaseConfig):
    """The model's sizes plus ``block_ffns``: one dict per block describing its FFN (what
    ``moelab export-hf`` writes; see the module docstring for the kinds)."""

    model_type = "moelab"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 512,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        max_position_embeddings: int = 1024,
        rope_theta: float = 1e6,
        rms_norm_eps: float = 1e-6,
        qkv_bias: bool = False,
        qk_norm: str = "none",
        block_ffns: list[dict] | None = None,
        initializer_range: float = 0.01,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.qkv_bias = qkv_bias
        self.qk_norm = qk_norm
        self.block_ffns = (
            block_ffns
            or [{"kind": "dense", "d_hidden": 4 * hidden_size, "activation": "gelu"}]
            * num_hidden_layers
        )
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


# ---------------------------------------------------------------------------------- pieces


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


def rope_cos_sin(positions_BL: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """float32 cos / sin ``[B, 1, L, Hd/2]``; angles computed in float64, as moelab does."""
    inv = base ** (
        -torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions_BL.device) / head_dim
    )
    angles = positions_BL.to(torch.float64)[..., None] * inv
    return angles.cos().float()[:, None], angles.sin().float()[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the pairs ``(x[i], x[i + Hd/2])`` in at least float32."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x.to(dtype).chunk(2, dim=-1)
    cos, sin = cos.to(dtype), sin.to(dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def activate(h: Tensor, activation: str) -> Tensor:
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(h)
    if activation == "relu":
        return F.relu(h)
    return F.silu(h)


def up_width(d_hidden: int, activation: str) -> int:
    return 2 * d_hidden if activation == "swiglu" else d_hidden


class Attention(nn.Module):
    def __init__(self, config: MoelabConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        D, bias = config.hidden_size, config.qkv_bias
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.wq = nn.Linear(D, q_dim, bias=bias)
        self.wk = nn.Linear(D, kv_dim, bias=bias)
        self.wv = nn.Linear(D, kv_dim, bias=bias)
        self.wo = nn.Linear(q_dim, D, bias=False)
        self.qk_norm = config.qk_norm
        if self.qk_norm != "none":
            full = self.qk_norm == "full"
            self.q_norm = RMSNorm(q_dim if full else self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(kv_dim if full else self.head_dim, config.rms_norm_eps)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, causal: bool, cache
    ) -> Tensor:
        B, L, _ = x.shape
        q, k = self.wq(x), self.wk(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.wo(y.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim))


class DenseFFN(nn.Module):
    """``w13_DF2`` (gate half, then up half, for SwiGLU) and ``w2_FD``, as moelab stores them."""

    def __init__(self, d_model: int, d_hidden: int, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.w13_DF2 = nn.Parameter(torch.empty(d_model, up_width(d_hidden, activation)))
        self.w2_FD = nn.Parameter(torch.empty(d_hidden, d_model))

    def forward(self, x: Tensor) -> Tensor:
        return activate(x @ self.w13_DF2, self.activation) @ self.w2_FD


class Router(nn.Module):
    def __init__(self, d_model: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))


class Experts(nn.Module):
    def __init__(self, num_experts: int, d_model: int, d_hidden: int, activation: str) -> None:
        super().__init__()
        self.w13_EDF2 = nn.Parameter(
            torch.empty(num_experts, d_model, up_width(d_hidden, activation))
        )
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))


class MoE(nn.Module):
    """Routed experts (+ shared experts). ``num_experts`` / ``top_k`` are the fine-grained counts
    (moelab's ``E·G`` and ``k·G``); ``d_hidden`` the width of one (fine-grained) expert."""

    def __init__(self, d_model: int, spec: dict) -> None:
        super().__init__()
        self.router_kind = spec["router"]
        self.num_experts, self.top_k = spec["num_experts"], spec["top_k"]
        self.activation = spec["activation"]
        self.renormalize = spec.get("renormalize", False)
        self.softmax_after_topk = spec.get("softmax_after_topk", False)
        self.capacity_factor = spec.get("capacity_factor")
        self.router = Router(d_model, self.num_experts)
        self.experts = Experts(self.num_experts, d_model, spec["d_hidden"], self.activation)
        shared = spec.get("shared_d_hidden", 0)
        self.shared = DenseFFN(d_model, shared, self.activation) if shared else None
        self.shared_gate = (
            nn.Linear(d_model, 1, bias=False) if spec.get("shared_gate", False) else None
        )

    def route(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        """``(assigned_TE bool, weight_TE)``: which experts each token uses, with what weight."""
        logits = F.linear(
            x_TD.to(torch.promote_types(x_TD.dtype, torch.float32)),
            self.router.weight.to(torch.promote_types(x_TD.dtype, torch.float32)),
        )
        if self.router_kind == "relu":  # ReMoE: every positive output is an assignment
            weight = F.relu(logits)
            return weight > 0, weight
        top_logits, top_idx = logits.topk(self.top_k, dim=-1)
        if self.softmax_after_topk:
            top_w = top_logits.softmax(dim=-1)
        else:
            top_w = logits.softmax(dim=-1).gather(1, top_idx)
            if self.renormalize:
                top_w = top_w / top_w.sum(-1, keepdim=True)
        assigned = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top_idx, True)
        weight = torch.zeros_like(logits).scatter(1, top_idx, top_w)
        return assigned, weight

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        assigned, weight = self.route(x_TD)
        if self.capacity_factor is not None:  # Switch capacity: earlier tokens first
            capacity = math.ceil(
                self.capacity_factor * x_TD.shape[0] * self.top_k / self.num_experts
            )
            assigned = assigned & (assigned.long().cumsum(0) <= capacity)
        y_TD = torch.zeros_like(x_TD)
        w13, w2 = self.experts.w13_EDF2, self.experts.w2_EFD
        for e in range(self.num_experts):
            rows = assigned[:, e].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            h = activate(x_TD[rows] @ w13[e].to(x.dtype), self.activation) @ w2[e].to(x.dtype)
            y_TD.index_add_(0, rows, h * weight[rows, e, None].to(x.dtype))
        if self.shared is not None:
            shared = self.shared(x_TD)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x_TD)) * shared
            y_TD = y_TD + shared
        return y_TD.reshape(shape)


class ProductKeyFFN(nn.Module):
    """PEER (``u``, ``v`` singleton experts, keys shared by the heads) or PKM (``values``, one key
    set per head): exact top-k over N = S² product keys, per head."""

    def __init__(self, d_model: int, spec: dict) -> None:
        super().__init__()
        self.kind = spec["kind"]
        n = spec["num_experts"] if self.kind == "peer" else spec["num_memories"]
        self.heads, self.top_k, self.d_key = spec["heads"], spec["top_k"], spec["d_key"]
        self.num_sub_keys = math.isqrt(n)
        self.query = nn.Linear(d_model, self.heads * self.d_key, bias=False)
        self.query_bn = (
            nn.BatchNorm1d(self.heads * self.d_key) if spec.get("query_batchnorm", True) else None
        )
        key_sets = 1 if self.kind == "peer" else self.heads
        self.sub_keys = nn.Parameter(torch.empty(key_sets, 2, self.num_sub_keys, self.d_key // 2))
        if self.kind == "peer":
            self.activation, self.gate = spec.get("activation", "relu"), spec.get("gate", "softmax")
            self.u = nn.Parameter(torch.empty(n, d_model))
            self.v = nn.Parameter(torch.empty(n, d_model))
        else:
            self.values = nn.Parameter(torch.empty(n, d_model))

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        T, H, K, S, half = x_TD.shape[0], self.heads, self.top_k, self.num_sub_keys, self.d_key // 2
        q = self.query(x_TD)
        if self.query_bn is not None:
            q = self.query_bn(q)
        q_BTd = q.view(T, H * 2, half).transpose(0, 1)  # (head, half) pairs
        keys = self.sub_keys.expand(H, 2, S, half).reshape(H * 2, S, half)
        top_v, top_i = torch.bmm(q_BTd, keys.transpose(1, 2)).topk(K, dim=-1)  # [2H, T, K]
        top_v, top_i = top_v.view(H, 2, T, K), top_i.view(H, 2, T, K)
        cand = top_v[:, 0, :, :, None] + top_v[:, 1, :, None, :]
        best, pos = cand.flatten(-2).topk(K, dim=-1)  # [H, T, K]
        idx = top_i[:, 0].gather(-1, pos // K) * S + top_i[:, 1].gather(-1, pos % K)
        scores, idx = best.permute(1, 0, 2).reshape(T, H * K), idx.permute(1, 0, 2).reshape(T, -1)
        if self.kind == "pkm":
            w = scores.view(T, H, K).softmax(-1).view(T, H * K)
            y = (w[..., None] * self.values[idx]).sum(1)
        else:
            g = scores.view(T, H, K)
            g = g.softmax(-1) if self.gate == "softmax" else torch.sigmoid(g)
            h = (self.u[idx] * x_TD[:, None, :]).sum(-1)
            h = F.relu(h) if self.activation == "relu" else F.gelu(h)
            y = ((g.reshape(T, H * K) * h)[..., None] * self.v[idx]).sum(1)
        return y.to(x.dtype).reshape(shape)


def build_ffn(d_model: int, spec: dict) -> nn.Module:
    kind = spec["kind"]
    if kind == "dense":
        return DenseFFN(d_model, spec["d_hidden"], spec["activation"])
    if kind == "moe":
        return MoE(d_model, spec)
    if kind in ("peer", "pkm"):
        return ProductKeyFFN(d_model, spec)
    raise ValueError(f"block_ffns: unknown FFN kind {kind!r}; supported: dense, moe, peer, pkm")


class Block(nn.Module):
    def __init__(self, config: MoelabConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn = build_ffn(config.hidden_size, config.block_ffns[layer_idx])

    def forward(self, x, cos, sin, mask, causal, cache):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, causal, cache)
        return x + self.ffn(self.ffn_norm(x))


class MoelabModel(nn.Module):
    def __init__(self, config: MoelabConfig) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


# ---------------------------------------------------------------------------------- model


class MoelabPreTrainedModel(PreTrainedModel):
    config_class = MoelabConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear | nn.Embedding):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, DenseFFN | Experts | Router | ProductKeyFFN):
            for p in module.parameters(recurse=False):
                p.normal_(0.0, std)


class MoelabForCausalLM(MoelabPreTrainedModel, GenerationMixin):
    """``forward(input_ids, attention_mask=None, ...) -> logits [B, L, V]`` (float32), with a
    ``transformers`` KV cache for ``generate()``. ``attention_mask`` zeros (left or right padding)
    are masked out of attention and shift the positions of left-padded rows, as ``transformers``
    models do; moelab itself has no attention mask."""

    _tied_weights_keys = (
        {"lm_head.weight": "model.tok_emb.weight"} if _MAJOR >= 5 else ["lm_head.weight"]
    )

    def __init__(self, config: MoelabConfig) -> None:
        super().__init__(config)
        self.model = MoelabModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.tok_emb

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.tok_emb = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values=None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        cache=None,
        **kwargs,
    ):
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and DynamicCache is not None:
            cache = DynamicCache()
        if not use_cache:
            cache = None
        x = self.model.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds
        B, L = x.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if past + L > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {past + L} positions exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        padded = (
            attention_mask is not None
            and attention_mask.dim() == 2
            and bool((attention_mask == 0).any())
        )
        if position_ids is None:
            if padded:  # left padding: real tokens start at position 0
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -L:]
            else:
                position_ids = torch.arange(past, past + L, device=x.device)[None].expand(B, L)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        mask, causal = None, False
        q_pos = torch.arange(past, past + L, device=x.device)
        k_pos = torch.arange(past + L, device=x.device)
        if padded:
            keep = (k_pos[None, :] <= q_pos[:, None])[None] & attention_mask[:, None, :].bool()
            keep = keep | (k_pos[None, None, :] == q_pos[None, :, None])  # no empty rows
            mask = keep[:, None]
        elif past == 0:
            causal = True
        elif L > 1:
            mask = k_pos[None, :] <= q_pos[:, None]
        for block in self.model.blocks:
            x = block(x, cos, sin, mask, causal, cache)
        logits = self.lm_head(self.model.norm(x)).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
