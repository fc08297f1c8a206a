"""The Hugging Face wrapper of moelab's model: the hand-written part of ``modeling_moelab.py``.

Not imported by moelab: :mod:`moelab.hf.gen_modeling` reads this file, copies its definitions
after the moelab definitions they use (the blocks, attention, every FFN layer and every exportable
router, verbatim) and writes the self-contained ``modeling_moelab.py``. Names defined here replace
moelab's: :class:`ModelConfig` (what moelab's ``Attention`` and ``Block`` read, taken from the
``transformers`` config), :func:`float_kernel` and :func:`load_c_kernel` (no C kernels in the
exported file: moelab's eager fallbacks run, same numbers within float rounding), and
:func:`check_quant_args` with
:class:`QuantizedExperts` (moelab's ``build_expert_bank`` is copied as it is, but a quantized bank
needs torchao, so the exported file refuses one).

    tokens ─► embedding ─► moelab Blocks ─► RMSNorm ─► LM head

``config.block_ffns`` holds one entry per block: ``{"kind": dense|moe|peer|pkm, **arguments of
the layer's constructor}`` (``moelab export-hf`` writes it). Parameter names are moelab's under
``model.``, so the weights are moelab's state dict unchanged. It runs inference and plain
fine-tuning; moelab's aux losses, statistics and between-step controllers are not driven here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from moelab.layers.base import RoutingContext
from moelab.layers.dense import DenseFFN
from moelab.layers.moe import MoE
from moelab.layers.peer import PEER
from moelab.layers.pkm import PKM
from moelab.layers.routers import share_recurrent_routers
from moelab.model.transformer import Block, RMSNorm, rope_tables

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
    "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
)
LAYERS = {"dense": DenseFFN, "moe": MoE, "peer": PEER, "pkm": PKM}


def check_quant_args(expert_quant: str, *_: Any) -> None:
    """Replaces moelab's check: the exported file holds float experts (merged weight slots
    included) or compressed stand-ins, never quantized ones, whose formats need torchao, which
    it does not import. moelab's ``build_expert_bank`` is copied and calls this first."""
    if expert_quant != "none":
        raise ValueError(
            f"expert_quant: a quantized run ({expert_quant!r}) is not exported; export the run "
            "it was quantized from"
        )


class QuantizedExperts(nn.Module):
    """Replaces moelab's quantized bank (never built here: :func:`check_quant_args` refuses)."""

    def __init__(self, *_: Any, **__: Any) -> None:
        raise ValueError("expert_quant: quantized experts are not exported")


def float_kernel(name: str, source: str, *tensors: Tensor) -> None:
    """No compiled C kernels in the exported file: callers take their eager path."""
    return None


def load_c_kernel(name: str, source: str) -> None:
    """No compiled C kernels in the exported file (integer kernels ask for theirs by this name)."""
    return None


class MoelabConfig(_BaseConfig):
    """The model's sizes plus ``block_ffns`` (one FFN description per block)."""

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
        **kwargs: Any,
    ) -> None:
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings, self.rope_theta = max_position_embeddings, rope_theta
        self.rms_norm_eps, self.qkv_bias, self.qk_norm = rms_norm_eps, qkv_bias, qk_norm
        dense = {"kind": "dense", "d_hidden": 4 * hidden_size, "activation": "gelu"}
        self.block_ffns = block_ffns or [dense] * num_hidden_layers
        self.initializer_range, self.use_cache = initializer_range, use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class FFNSpec:
    """One ``block_ffns`` entry; ``build`` makes its moelab layer (as moelab's FFN configs do)."""

    def __init__(self, spec: dict) -> None:
        self.spec = dict(spec)

    def build(self, d_model: int, init_std: float) -> nn.Module:
        args = dict(self.spec)
        layer = LAYERS[args.pop("kind")]
        if "init_std" not in args:
            args["init_std"] = init_std
        return layer(d_model, **args)


class ModelConfig:
    """What moelab's ``Attention`` and ``Block`` read of a model config, from a MoelabConfig."""

    def __init__(self, config: MoelabConfig) -> None:
        self.d_model, self.n_heads = config.hidden_size, config.num_attention_heads
        self.kv_heads, self.head_dim = config.num_key_value_heads, config.head_dim
        self.qkv_bias, self.qk_norm = config.qkv_bias, config.qk_norm
        self.norm_eps, self.init_std = config.rms_norm_eps, config.initializer_range
        self.block_ffns = config.block_ffns

    def ffn_for(self, layer: int) -> FFNSpec:
        return FFNSpec(self.block_ffns[layer])


class HFCache:
    """moelab's KV-cache interface over a ``transformers`` cache (or none), with the padding mask:
    ``attention_mask`` zeros (left or right padding) are masked out of attention."""

    def __init__(self, cache: Any, pad_mask_BP: Tensor | None) -> None:
        self.cache, self.pad_mask_BP = cache, pad_mask_BP
        self.length = cache.get_seq_length() if cache is not None else 0

    def update(self, layer: int, k_BGLd: Tensor, v_BGLd: Tensor) -> tuple[Tensor, Tensor]:
        return (k_BGLd, v_BGLd) if self.cache is None else self.cache.update(k_BGLd, v_BGLd, layer)

    def attention_mask(self, length: int, device: torch.device) -> tuple[Tensor | None, bool]:
        past = self.length
        q_pos = torch.arange(past, past + length, device=device)
        k_pos = torch.arange(past + length, device=device)
        if self.pad_mask_BP is None:
            if past == 0 or length == 1:
                return None, past == 0
            return k_pos[None, :] <= q_pos[:, None], False
        keep = (k_pos[None, :] <= q_pos[:, None])[None] & self.pad_mask_BP[:, None, :].bool()
        keep = keep | (k_pos[None, None, :] == q_pos[None, :, None])  # no empty rows
        return keep[:, None], False


class MoelabModel(nn.Module):
    def __init__(self, config: MoelabConfig) -> None:
        super().__init__()
        cfg = ModelConfig(config)
        self.tok_emb = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(config.num_hidden_layers))
        share_recurrent_routers(self.blocks)  # RMoE: one GRU for all layers, as in moelab
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def shared_parameters(module: nn.Module) -> dict[str, str]:
    """``{name: first name}`` of parameters held under several names (RMoE's GRU, shared by
    every layer), which ``transformers`` must know as tied to save and load them."""
    first: dict[int, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
    return {
        name: first[id(p)]
        for name, p in module.named_parameters(remove_duplicate=False)
        if first[id(p)] != name
    }


class MoelabPreTrainedModel(PreTrainedModel):
    config_class = MoelabConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = False

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        """``transformers`` 5's ``{target: source}`` of tied parameters, plus the parameters
        moelab's model holds once under several names (loading ties them back)."""
        tied = super().get_expanded_tied_weights_keys(all_submodels)
        return shared_parameters(self) | tied

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Linear / embedding weights ~ N(0, initializer_range); moelab's layers init their own."""
        if isinstance(module, nn.Linear | nn.Embedding):
            module.weight.normal_(0.0, self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()


class MoelabForCausalLM(MoelabPreTrainedModel, GenerationMixin):
    """``forward(input_ids, attention_mask=None, ...) -> logits [B, L, V]`` (float32), with a
    ``transformers`` KV cache for ``generate()``. ``attention_mask`` zeros are masked out of
    attention, shift the positions of left-padded rows and are left out of routing capacity."""

    _tied_weights_keys = (
        {"lm_head.weight": "model.tok_emb.weight"} if _MAJOR >= 5 else ["lm_head.weight"]
    )

    def __init__(self, config: MoelabConfig) -> None:
        super().__init__(config)
        self.model = MoelabModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        shared = shared_parameters(self)  # save_pretrained writes tied names once
        tied = type(self)._tied_weights_keys
        self._tied_weights_keys = tied | shared if _MAJOR >= 5 else [*tied, *shared]
        self._rope: tuple[Tensor, Tensor] | None = None  # float32, built on first use
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
        past_key_values: Any = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and DynamicCache is not None:
            cache = DynamicCache()
        x = self.model.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds
        B, L = x.shape[:2]
        padded = attention_mask is not None and bool((attention_mask == 0).any())
        kv = HFCache(cache if use_cache else None, attention_mask if padded else None)
        if kv.length + L > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {kv.length + L} positions exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        if position_ids is None:
            if padded:  # left padding: real tokens start at position 0
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -L:]
            else:
                position_ids = torch.arange(kv.length, kv.length + L, device=x.device)[None]
        if self._rope is None or self._rope[0].device != x.device:  # not buffers: no bf16 angles
            c = self.config
            tables = rope_tables(c.head_dim, c.max_position_embeddings, c.rope_theta)
            self._rope = tables[0].float().to(x.device), tables[1].float().to(x.device)
        cos, sin = (t[position_ids.expand(B, L)][:, None] for t in self._rope)
        token_mask = attention_mask[:, -L:].bool() if padded else None
        context = RoutingContext(token_ids=input_ids)
        for block in self.model.blocks:
            x = block(x, cos, sin, token_mask, kv, context)
            context = context.next_layer()
        logits = self.lm_head(self.model.norm(x)).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
