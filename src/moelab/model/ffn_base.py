"""What every FFN-slot config shares (:class:`FFNSlot`: resolve, build, accounting), the dense
FFN's config (:class:`DenseConfig`) and the helpers the other kinds use: the automatic FFN width,
an FFN's parameter count, and turning a layer's ``ValueError`` into a :class:`ConfigError` on the
config's field. The accounting conventions are in :mod:`moelab.model.ffn_configs`."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any, ClassVar, Literal

from torch import nn

from moelab.config import Config, ConfigError
from moelab.layers.dense import DenseFFN, up_width

Activation = Literal["swiglu", "gelu", "relu", "silu"]


def auto_d_hidden(d_model: int, activation: str) -> int:
    """LLaMA's FFN width: ``8/3·d_model`` for SwiGLU (same parameters as a ``4·d_model`` GELU MLP),
    rounded up to a multiple of 64 (8 for models narrower than 256); ``4·d_model`` otherwise."""
    if activation != "swiglu":
        return 4 * d_model
    multiple = 64 if d_model >= 256 else 8
    return multiple * math.ceil(8 * d_model / 3 / multiple)


def ffn_params(d_model: int, d_hidden: int, activation: str) -> int:
    """One (bias-free) FFN: fused up/gate ``[D, up]`` and down ``[F, D]``."""
    return d_model * up_width(d_hidden, activation) + d_hidden * d_model


def layer_checks(config: Config, run: Callable[[], Any]) -> None:
    """Run a layer's argument checks; a ``ValueError("name must ...")`` about one of ``config``'s
    fields becomes a :class:`ConfigError` on that field."""
    try:
        run()
    except ValueError as err:
        text = str(err)
        match = re.match(r"(\w+) (.*)", text, re.S)
        names = {f.name for f in dataclasses.fields(config)}
        if match and match.group(1) in names:
            raise ConfigError(match.group(1), match.group(2)) from None
        raise ConfigError("", text) from None


@dataclasses.dataclass(kw_only=True)
class FFNSlot(Config):
    """What every FFN-slot config provides."""

    layer_type: ClassVar[str]  # the row of the accounting table
    null_means_default: ClassVar[tuple[str, ...]] = ("activation", "num_experts", "top_k")

    def resolved(self, d_model: int) -> FFNSlot:
        """This config with automatic values (``None``) filled in for a model of width D."""
        return self

    def for_seq_len(self, seq_len: int, where: str) -> FFNSlot:
        """This config for sequences of up to ``seq_len`` tokens (``where`` names that length in
        messages: ``max_seq_len``, ``data.seq_len``): options that depend on it derived or
        checked (:class:`ConfigError` on the option). Most kinds have none."""
        return self

    def build(self, d_model: int, init_std: float) -> nn.Module:
        raise NotImplementedError

    def accounting(self, d_model: int) -> dict[str, int]:
        """``total_params``, ``active_params``, ``matmul_active``, ``extra_flops`` of one layer of
        this (resolved) config, and ``model_shared_params`` where some of its parameters are held
        once per model (absent: 0; see the module docstring). A routed kind adds
        ``assignment_flops`` (forward FLOPs of one computed (token, expert) assignment) and
        ``assignments_per_token`` (the nominal count in ``matmul_active``): the layer's measured
        ``expert_flops`` are its computed assignments times ``assignment_flops``."""
        raise NotImplementedError

    def counted(self, layer: nn.Module, d_model: int) -> nn.Module:
        """``layer`` (built from this config) with ``assignment_flops`` from this config's
        accounting, so that the FLOPs it measures are the ones the accounting counts."""
        layer.assignment_flops = self.accounting(d_model)["assignment_flops"]
        return layer

    def untrainable(self) -> tuple[str, str] | None:
        """``(field, reason)`` when a model of this config cannot be trained (quantized experts);
        None for every trainable one."""
        return None

    @property
    def method(self) -> str:
        """Short name of the method, used in run names and reports."""
        return self.kind

    @property
    def sparsity_target(self) -> float | None:
        """The target of the λ controller for this layer (None: the layer has none)."""
        return None


@dataclasses.dataclass(kw_only=True)
class DenseConfig(FFNSlot):
    """A dense FFN of width ``d_hidden`` (None: :func:`auto_d_hidden`)."""

    layer_type: ClassVar[str] = "dense_ffn"
    kind: Literal["dense"] = "dense"
    d_hidden: int | None = None
    activation: Activation = "swiglu"

    def validate(self) -> None:
        dh = self.d_hidden
        if dh is not None and dh <= 0:
            raise ConfigError("d_hidden", f"must be a positive integer or null, got {dh}")

    def resolved(self, d_model: int) -> DenseConfig:
        if self.d_hidden is not None:
            return self
        return dataclasses.replace(self, d_hidden=auto_d_hidden(d_model, self.activation))

    def build(self, d_model: int, init_std: float) -> nn.Module:
        return DenseFFN(d_model, self.d_hidden, self.activation, init_std=init_std)

    def accounting(self, d_model: int) -> dict[str, int]:
        p = ffn_params(d_model, self.d_hidden, self.activation)
        return {"total_params": p, "active_params": p, "matmul_active": p, "extra_flops": 0}


def field_default(cls: type, name: str) -> Any:
    """The default value of dataclass field ``name`` of ``cls`` (its factory called)."""
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
