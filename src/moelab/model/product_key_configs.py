"""The product-key FFN configs: :class:`PEERConfig` (PEER's singleton experts) and
:class:`PKMConfig` (Lample et al.'s product-key memory), with their shared options and
accounting."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

from torch import nn

from moelab.config import ConfigError
from moelab.layers.peer import ACTIVATIONS as PEER_ACTIVATIONS
from moelab.layers.peer import GATES as PEER_GATES
from moelab.layers.peer import PEER
from moelab.layers.pkm import PKM
from moelab.layers.product_keys import check_product_key_args
from moelab.model.ffn_base import FFNSlot, layer_checks

PEERActivation = Literal[PEER_ACTIVATIONS]  # type: ignore[valid-type]
PEERGate = Literal[PEER_GATES]  # type: ignore[valid-type]


@dataclasses.dataclass(kw_only=True)
class _ProductKeyConfig(FFNSlot):
    """Options shared by PEER and PKM."""

    keys_field: ClassVar[str]
    heads: int = 8
    d_key: int = 128
    query_batchnorm: bool = True

    def validate(self) -> None:
        layer_checks(
            self,
            lambda: check_product_key_args(
                num_keys=getattr(self, self.keys_field),
                top_k=self.top_k,
                d_key=self.d_key,
                heads=self.heads,
                keys_name=self.keys_field,
            ),
        )

    def _product_key_accounting(self, d_model: int, keys: int, row_params: int) -> dict[str, int]:
        n = getattr(self, self.keys_field)
        h, k, dk = self.heads, self.top_k, self.d_key
        queries = h * d_model * dk
        bn = 2 * h * dk if self.query_batchnorm else 0
        experts_active = h * k * row_params
        return {
            "total_params": n * row_params + queries + bn + keys,
            "active_params": experts_active + queries + bn,
            "matmul_active": experts_active + queries,
            "extra_flops": h * (2 * math.isqrt(n) * dk + k * k),
            "assignment_flops": 2 * row_params,  # one retrieved row (expert), per token
            "assignments_per_token": h * k,
        }


@dataclasses.dataclass(kw_only=True)
class PEERConfig(_ProductKeyConfig):
    """PEER (:class:`~moelab.layers.PEER`): ``num_experts`` single-neuron experts (a perfect
    square), ``heads`` retrieval heads of ``top_k`` experts each, ``d_key``, ``query_batchnorm``,
    ``activation`` and ``gate`` of the experts. Initialised with the model's ``init_std``."""

    layer_type: ClassVar[str] = "peer"
    keys_field: ClassVar[str] = "num_experts"
    kind: Literal["peer"] = "peer"
    num_experts: int = 1024**2
    top_k: int = 16
    activation: PEERActivation = "relu"
    gate: PEERGate = "softmax"

    def build(self, d_model: int, init_std: float) -> nn.Module:
        layer = PEER(
            d_model,
            num_experts=self.num_experts,
            heads=self.heads,
            top_k=self.top_k,
            d_key=self.d_key,
            query_batchnorm=self.query_batchnorm,
            activation=self.activation,
            gate=self.gate,
            init_std=init_std,
        )
        return self.counted(layer, d_model)

    def accounting(self, d_model: int) -> dict[str, int]:
        keys = math.isqrt(self.num_experts) * self.d_key  # 2 halves x √N x d_key/2, shared
        return self._product_key_accounting(d_model, keys, 2 * d_model)


@dataclasses.dataclass(kw_only=True)
class PKMConfig(_ProductKeyConfig):
    """Product-key memory (:class:`~moelab.layers.PKM`): ``num_memories`` value rows (a perfect
    square), ``heads``, ``top_k``, ``d_key``, ``query_batchnorm``. ``init_std`` of the values:
    null keeps Lample et al.'s ``d_model^-1/2`` (the model's ``init_std`` is not used)."""

    layer_type: ClassVar[str] = "pkm"
    keys_field: ClassVar[str] = "num_memories"
    kind: Literal["pkm"] = "pkm"
    num_memories: int = 1024**2
    top_k: int = 32
    init_std: float | None = None

    def validate(self) -> None:
        super().validate()
        if self.init_std is not None and not self.init_std > 0:
            raise ConfigError("init_std", f"must be > 0 or null, got {self.init_std}")

    def build(self, d_model: int, init_std: float) -> nn.Module:
        layer = PKM(
            d_model,
            num_memories=self.num_memories,
            heads=self.heads,
            top_k=self.top_k,
            d_key=self.d_key,
            query_batchnorm=self.query_batchnorm,
            init_std=self.init_std,
        )
        return self.counted(layer, d_model)

    def accounting(self, d_model: int) -> dict[str, int]:
        keys = self.heads * math.isqrt(self.num_memories) * self.d_key  # one set per head
        return self._product_key_accounting(d_model, keys, d_model)
