"""A LLaMA-style decoder LM with a swappable FFN slot, readable top to bottom.

    tokens ─► embedding ─► n_layers × Block ─► RMSNorm ─► LM head ─► logits
    Block:  x = x + Attention(RMSNorm(x))        (GQA, RoPE, causal SDPA)
            x = x + FFN(RMSNorm(x), token_mask)   (DenseFFN | MoE | PEER | PKM)

Shape legend: B batch, L sequence (new tokens), P cached positions, D d_model, H query heads,
G key/value heads (GQA groups), Hd head dim, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moelab.layers.base import RoutedLayer, RoutingContext, routed_layers
from moelab.layers.dense import DenseFFN
from moelab.layers.moe import MoE
from moelab.layers.routers import share_recurrent_routers
from moelab.model.config import ModelConfig

# ----------------------------------------------------------------------------------------- pieces


class RMSNorm(nn.Module):
    """``x / rms(x) · w`` (Zhang & Sennrich 2019), computed in float32 for bf16 stability."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


def rope_tables(head_dim: int, max_len: int, base: float) -> tuple[Tensor, Tensor]:
    """RoPE tables (Su et al. 2021), cos and sin ``[max_len, Hd/2]``.

    Pair i turns by ``pos·base^(-2i/Hd)``. Built in float64 so that long contexts with base 1e6
    keep exact angles; cast on use.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x_BHLd: Tensor, cos_Ld2: Tensor, sin_Ld2: Tensor) -> Tensor:
    """Rotate the pairs ``(x[i], x[i + Hd/2])`` (the "half split" layout LLaMA checkpoints in
    ``transformers`` use, so exported weights need no permutation), in at least float32."""
    dtype = torch.promote_types(x_BHLd.dtype, torch.float32)  # rotate in >= float32
    x1, x2 = x_BHLd.to(dtype).chunk(2, dim=-1)
    cos, sin = cos_Ld2.to(dtype), sin_Ld2.to(dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x_BHLd.dtype)


class KVCache:
    """Pre-allocated keys and values of every block for incremental decoding.

    ``length`` is the number of positions already stored; a forward with a cache appends its L new
    positions (at RoPE positions ``length .. length+L-1``) and then advances ``length``.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.max_len = max_len or cfg.max_seq_len
        shape = (batch_size, cfg.kv_heads, self.max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.length = 0
        # Left padding (set_left_padding): pad_B[b] leading positions of row b hold no token.
        self.pad_B: Tensor | None = None
        self._key_valid_BP: Tensor | None = None
        self._pad_max = 0  # the longest padding: later positions are real in every row

    def set_left_padding(self, pad_B: Tensor) -> None:
        """Declare that row b's first ``pad_B[b]`` positions are padding (set before the first
        forward). From then on padded keys are masked out of attention, each row's positions
        count from its first real token (so its RoPE angles are those of the row alone) and
        :meth:`token_mask` marks padded queries, which routed layers leave out of routing."""
        if self.length != 0:
            raise ValueError("left padding must be set on an empty KV cache")
        batch = self.k[0].shape[0] if self.k else pad_B.shape[0]
        if pad_B.shape != (batch,):
            raise ValueError(f"pad_B must have shape ({batch},), got {tuple(pad_B.shape)}")
        device = self.k[0].device if self.k else pad_B.device
        self.pad_B = pad_B.to(device=device, dtype=torch.long)
        if not bool((self.pad_B > 0).any()):
            self.pad_B = None  # no row is padded: the plain (faster) path
            return
        self._pad_max = int(self.pad_B.max())  # one sync, at set-up
        self._key_valid_BP = self._key_valid(self.max_len)

    def fork(self, max_len: int) -> KVCache:
        """A copy of the stored positions (and padding) with room for ``max_len``: decoding on
        from it gives what decoding on from this cache would, and leaves this one as it is (one
        prefilled prompt, several continuations scored from it)."""
        if not self.length <= max_len:
            raise ValueError(f"max_len ({max_len}) must be >= the stored positions ({self.length})")
        new = KVCache.__new__(KVCache)
        new.__dict__.update(self.__dict__)
        new.max_len = max_len

        def resized(t_BGPd: Tensor) -> Tensor:
            out = t_BGPd.new_zeros((*t_BGPd.shape[:2], max_len, t_BGPd.shape[3]))
            out[:, :, : self.length] = t_BGPd[:, :, : self.length]
            return out

        new.k, new.v = [resized(t) for t in self.k], [resized(t) for t in self.v]
        if self.pad_B is not None:
            new._key_valid_BP = self._key_valid(max_len)
        return new

    def _key_valid(self, max_len: int) -> Tensor:
        """``[B, max_len]``: True at the positions that hold a token (past each row's padding)."""
        positions_P = torch.arange(max_len, device=self.pad_B.device)
        return positions_P[None, :] >= self.pad_B[:, None]

    def positions(self, length: int, device: torch.device) -> Tensor | None:
        """RoPE positions ``[B, L]`` of the ``length`` new tokens, counted per row from its first
        real token (padded positions get 0); None without padding (positions are shared)."""
        if self.pad_B is None:
            return None
        steps_L = torch.arange(self.length, self.length + length, device=device)
        return (steps_L[None, :] - self.pad_B[:, None]).clamp_min(0)

    def token_mask(self, length: int) -> Tensor | None:
        """bool ``[B, L]``, True for the new positions that hold a real token; None when all do."""
        if self._key_valid_BP is None or self.length >= self._pad_max:
            return None
        return self._key_valid_BP[:, self.length : self.length + length]

    def update(self, layer: int, k_BGLd: Tensor, v_BGLd: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``layer``'s new keys/values; return all of them so far, ``[B, G, P+L, Hd]``."""
        start, end = self.length, self.length + k_BGLd.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked for {end}")
        self.k[layer][:, :, start:end] = k_BGLd
        self.v[layer][:, :, start:end] = v_BGLd
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def attention_mask(self, length: int, device: torch.device) -> tuple[Tensor | None, bool]:
        """SDPA's ``(attn_mask, is_causal)`` for ``length`` new queries after the stored
        positions (asked of the cache, so that one knowing of padding, as the exported model's,
        masks it)."""
        past = self.length
        if self._key_valid_BP is not None:  # causal and no padded key; a padded query sees itself
            q_pos = torch.arange(past, past + length, device=device)
            k_pos = torch.arange(past + length, device=device)
            keep_LP = k_pos[None, :] <= q_pos[:, None]
            keep_BLP = keep_LP[None] & self._key_valid_BP[:, None, : past + length]
            keep_BLP = keep_BLP | (k_pos[None, None, :] == q_pos[None, :, None])  # no empty row
            return keep_BLP[:, None], False
        if past == 0:  # square causal mask
            return None, True
        if length == 1:  # one new query sees every cached key
            return None, False
        # L new queries at positions past.., keys 0..past+L-1: bottom-right aligned mask
        q_pos = torch.arange(past, past + length, device=device)
        k_pos = torch.arange(past + length, device=device)
        return k_pos[None, :] <= q_pos[:, None], False


class Attention(nn.Module):
    """Causal grouped-query attention (Ainslie et al. 2023) with RoPE and no biases.

    G key/value heads serve H query heads (H/G queries share one K/V); G == H is plain MHA.
    Options of imported architectures (:mod:`moelab.hf`): ``qkv_bias`` (Qwen2), ``qk_norm``
    (RMSNorm of queries and keys before RoPE: ``full`` over the projection, OLMoE; ``head`` per
    head, Qwen3).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, q_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q_dim, cfg.d_model, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm != "none":
            full = cfg.qk_norm == "full"
            self.q_norm = RMSNorm(q_dim if full else cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(kv_dim if full else cfg.head_dim, cfg.norm_eps)

    def forward(
        self, x_BLD: Tensor, cos_Ld2: Tensor, sin_Ld2: Tensor, kv_cache: KVCache | None = None
    ) -> Tensor:
        B, L, _ = x_BLD.shape
        q, k = self.wq(x_BLD), self.wk(x_BLD)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q_BHLd = q.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k_BGLd = k.view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v_BGLd = self.wv(x_BLD).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q_BHLd, k_BGLd = self.q_norm(q_BHLd), self.k_norm(k_BGLd)
        q_BHLd, k_BGLd = apply_rope(q_BHLd, cos_Ld2, sin_Ld2), apply_rope(k_BGLd, cos_Ld2, sin_Ld2)

        mask, causal = None, True  # no cache: square causal mask
        if kv_cache is not None:
            mask, causal = kv_cache.attention_mask(L, x_BLD.device)
            k_BGLd, v_BGLd = kv_cache.update(self.layer_idx, k_BGLd, v_BGLd)
        y_BHLd = F.scaled_dot_product_attention(
            q_BHLd,
            k_BGLd,
            v_BGLd,
            attn_mask=mask,
            is_causal=causal,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.wo(y_BHLd.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim))


class Block(nn.Module):
    """Pre-norm residual block: attention, then the FFN slot."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = cfg.ffn_for(layer_idx).build(cfg.d_model, cfg.init_std)

    def forward(
        self,
        x_BLD: Tensor,
        cos_Ld2: Tensor,
        sin_Ld2: Tensor,
        token_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
        context: RoutingContext | None = None,
    ) -> Tensor:
        x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD), cos_Ld2, sin_Ld2, kv_cache)
        return x_BLD + self.ffn(self.ffn_norm(x_BLD), token_mask=token_mask, context=context)


# ------------------------------------------------------------------------------------------ model


class TransformerLM(nn.Module):
    """Decoder-only LM; ``forward(input_ids [B, L], token_mask=None, kv_cache=None) -> [B, L, V]``.

    Every FFN slot also gets a :class:`~moelab.layers.base.RoutingContext`: the input ids (Hash
    routing) and the state routed layers pass to the next (recurrent routers, momentum).

    ``token_mask`` (bool, True = real token) is handed to every FFN slot so routed layers leave
    padding out of their losses and statistics. It is *not* an attention mask: attention is causal
    only, which is exact for right padding (pad positions come after every real token). Left
    padding is declared on the KV cache instead (:meth:`KVCache.set_left_padding`, what batched
    generation uses): padded keys are then masked out of attention, positions count per row and
    padded positions are left out of routing.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"TransformerLM expects a ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.activation_checkpointing = cfg.activation_checkpointing
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        share_recurrent_routers(self.blocks)  # RMoE: one GRU for all layers, as the paper
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # RoPE tables are plain float32 attributes, not buffers, so that model.to(bfloat16) cannot
        # round the angles; they follow the model's device on first use (see rope()).
        self._rope_cos, self._rope_sin = (
            t.float() for t in rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere (ReMoE: 0.01), norms at 1.

        With ``scaled_residual_init`` the projections that write into the residual stream
        (attention ``wo`` and the FFN/expert down projections ``w2*``) use
        ``init_std / sqrt(2·n_layers)`` (GPT-2 / Megatron-LM, which ReMoE trains with), so the
        residual stream's variance does not grow with depth. PEER / PKM keep their own init.
        """
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers) if self.cfg.scaled_residual_init else std
        nn.init.normal_(self.tok_emb.weight, std=std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.blocks:
            for lin in (block.attn.wq, block.attn.wk, block.attn.wv):
                nn.init.normal_(lin.weight, std=std)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            nn.init.normal_(block.attn.wo.weight, std=out_std)
            norms = [block.attn_norm, block.ffn_norm]
            if block.attn.qk_norm != "none":
                norms += [block.attn.q_norm, block.attn.k_norm]
            for norm in norms:
                nn.init.ones_(norm.weight)
            if isinstance(block.ffn, DenseFFN | MoE):  # DenseFFN.w2_FD, experts' w2_EFD
                for name, p in block.ffn.named_parameters():
                    if name.rsplit(".", 1)[-1].startswith("w2"):
                        nn.init.normal_(p, std=out_std)
        nn.init.ones_(self.norm.weight)

    def forward(
        self,
        input_ids: Tensor,
        token_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        B, L = input_ids.shape
        start = 0 if kv_cache is None else kv_cache.length
        if start + L > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {start + L} positions exceeds max_seq_len={self.cfg.max_seq_len}"
            )
        if token_mask is not None and token_mask.shape != input_ids.shape:
            raise ValueError(
                f"token_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(token_mask.shape)}"
            )
        cos_Ld2, sin_Ld2 = self.rope(start, L, input_ids.device)
        if kv_cache is not None:
            self._check_decodable()
            positions_BL = kv_cache.positions(L, input_ids.device)
            if positions_BL is not None:  # left-padded rows: each row's own positions
                cos_Ld2, sin_Ld2 = (t[positions_BL][:, None] for t in self._rope_tables())
            pad_mask = kv_cache.token_mask(L)
            if pad_mask is not None:  # padded positions never enter routing
                token_mask = pad_mask if token_mask is None else token_mask & pad_mask

        x_BLD = self.tok_emb(input_ids)
        use_ckpt = self.activation_checkpointing and torch.is_grad_enabled() and kv_cache is None
        context = RoutingContext(token_ids=input_ids)
        for block in self.blocks:
            if use_ckpt:
                x_BLD = checkpoint(
                    block, x_BLD, cos_Ld2, sin_Ld2, token_mask, None, context, use_reentrant=False
                )
            else:
                x_BLD = block(x_BLD, cos_Ld2, sin_Ld2, token_mask, kv_cache, context)
            context = context.next_layer()
        if kv_cache is not None:
            kv_cache.length += L
        return self.lm_head(self.norm(x_BLD))

    def _check_decodable(self) -> None:
        """Refuse KV-cache decoding when a routed layer's router says it cannot decode exactly
        (its ``kv_cache_error``: Lory's segment routing keeps no decoding state)."""
        for block in self.blocks:
            error = getattr(getattr(block.ffn, "router", None), "kv_cache_error", None)
            if error:
                raise ValueError(error)

    def rope(self, start: int, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """float32 cos / sin ``[length, Hd/2]`` of positions ``start .. start+length-1``."""
        self._rope_tables(device)
        end = start + length
        return self._rope_cos[start:end], self._rope_sin[start:end]

    def _rope_tables(self, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """The whole cos / sin tables ``[max_seq_len, Hd/2]``, moved to ``device`` once."""
        if device is not None and self._rope_cos.device != device:
            self._rope_cos, self._rope_sin = self._rope_cos.to(device), self._rope_sin.to(device)
        return self._rope_cos, self._rope_sin

    def routed_layers(self) -> list[RoutedLayer]:
        """The MoE / PEER / PKM layers, in block order (for aux losses and routing statistics)."""
        return routed_layers(self)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty cache on this model's device and dtype."""
        p = self.tok_emb.weight
        return KVCache(self.cfg, batch_size, max_len, device=p.device, dtype=p.dtype)

    def num_params(self) -> int:
        """Parameters counted once (a tied head shares the embedding)."""
        return sum(p.numel() for p in self.parameters())
