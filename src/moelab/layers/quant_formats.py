"""Storage formats of quantized expert weights, one :class:`ExpertBank` per precision.

A bank holds some experts' two matrices (``w13``: ``[D, up]``, ``w2``: ``[F, D]``, the layout of
:class:`~moelab.layers.experts.GroupedExperts`) in one format, as buffers of plain tensors, so
checkpoints stay safetensors files of ordinary dtypes. Quantization is group-wise along each
matrix's input dimension (``group`` consecutive inputs of one output share a scale), and every
step that touches bits is a library's, never ours:

* ``int8``: symmetric int8 through torchao's affine primitives (``choose_qparams_affine``,
  ``quantize_affine``, ``dequantize_affine``); stored as ``int8 [n, N, K]`` plus ``float32
  [n, N, K/group]`` scales, dequantized one expert at a time in the forward (torchao's int8
  CPU kernels are per-row only, not group-wise).
* ``int4``: asymmetric 4-bit with a float zero point (the "tinygemm" scheme, torchao's
  ``Int4OpaqueTensor`` CPU format): torchao chooses the scales and quantizes, PyTorch's own CPU
  kernels pack (``_convert_weight_to_int4pack_for_cpu``: two values per byte) and multiply
  (``_weight_int4pack_mm_for_cpu``), so no float copy of the weight is made. The kernel runs in
  bfloat16 (activations cast, scales and zero points stored bf16): its float32 path measured
  ~35x slower than its bf16 one on this CPU (229 vs 6.4 ms for [64,128]x[128,768]).
* ``fp32``: the weights unchanged (the experts kept at full precision beside int8 ones).

``clip_NG`` (optional, per output row and group) shrinks the range a group's scale covers, so
a calibration search (:mod:`moelab.compress.quantization`) can trade the outliers' error for a
finer grid; 1.0 everywhere is the library's plain choice.

torchao is an optional dependency (``pip install moelab[compress]``); it is imported on first
use, with its warnings about CUDA extensions it cannot load on a CPU machine silenced.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

QUANT_FORMATS = ("none", "int8", "int4")  # the ``expert_quant`` values
# group sizes per format: the int4 CPU kernel's; int8 (dequantized in Python) also smaller ones
QUANT_GROUPS = {"int8": (8, 16, 32, 64, 128, 256), "int4": (32, 64, 128, 256)}
HIGHER = {"int4": "int8", "int8": "fp32"}  # the precision of experts kept high beside each format


def torchao_primitives() -> Any:
    """torchao's ``quant_primitives`` module (``ValueError`` naming the install when absent)."""
    # silenced on import: "Failed to load ... .so" (its CUDA kernels, unused here) and torch's
    # pytree deprecation notice about one of its enums
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        from torchao.quantization import quant_primitives
    except ImportError:
        raise ValueError(
            "expert_quant: quantized experts need torchao (pip install 'moelab[compress]')"
        ) from None
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)
    return quant_primitives


def _clipped(w_NK: Tensor, clip_NG: Tensor | None, group: int) -> Tensor:
    """``w`` with each group scaled by its clip ratio: the qparams chosen on it cover that range."""
    if clip_NG is None:
        return w_NK
    n, k = w_NK.shape
    return (w_NK.view(n, k // group, group) * clip_NG[..., None]).view(n, k)


class ExpertBank(nn.Module):
    """``n`` experts' ``w13`` and ``w2`` in one format; ``slot`` indexes the bank's experts."""

    fmt: ClassVar[str]
    bits: ClassVar[int]  # bits per stored weight, without scales

    def __init__(self, n: int, shapes: dict[str, tuple[int, int]], group: int) -> None:
        super().__init__()
        self.n, self.shapes, self.group = n, shapes, group  # shapes: name -> (N out, K in)

    def set_(self, slot: int, name: str, w_KN: Tensor, clip_NG: Tensor | None = None) -> None:
        """Store expert weight ``w_KN`` (input-major, as GroupedExperts holds it) in ``slot``."""
        raise NotImplementedError

    def linear(self, slot: int, name: str, x_nK: Tensor) -> Tensor:
        """``x @ w`` for the stored weight (float32 rows in, float32 rows out)."""
        raise NotImplementedError

    def dequantized(self, slot: int, name: str) -> Tensor:
        """The weight the forward uses, float32 ``[K, N]`` (for tests and analysis)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"experts={self.n}, format={self.fmt}, group={self.group}"


class FloatBank(ExpertBank):
    """Full-precision experts, in GroupedExperts' layout (so their matmuls are the same)."""

    fmt, bits = "fp32", 32

    def __init__(self, n: int, shapes: dict[str, tuple[int, int]], group: int) -> None:
        super().__init__(n, shapes, group)
        for name, (out, inp) in shapes.items():
            self.register_buffer(f"{name}_w", torch.zeros(n, inp, out))

    def set_(self, slot: int, name: str, w_KN: Tensor, clip_NG: Tensor | None = None) -> None:
        getattr(self, f"{name}_w")[slot].copy_(w_KN)

    def linear(self, slot: int, name: str, x_nK: Tensor) -> Tensor:
        return x_nK @ getattr(self, f"{name}_w")[slot]

    def dequantized(self, slot: int, name: str) -> Tensor:
        return getattr(self, f"{name}_w")[slot].clone()


class Int8Bank(ExpertBank):
    """Symmetric group-wise int8 (torchao primitives), dequantized per expert in the forward."""

    fmt, bits = "int8", 8

    def __init__(self, n: int, shapes: dict[str, tuple[int, int]], group: int) -> None:
        super().__init__(n, shapes, group)
        for name, (out, inp) in shapes.items():
            self.register_buffer(f"{name}_q", torch.zeros(n, out, inp, dtype=torch.int8))
            self.register_buffer(f"{name}_scale", torch.ones(n, out, inp // group))

    def set_(self, slot: int, name: str, w_KN: Tensor, clip_NG: Tensor | None = None) -> None:
        qp = torchao_primitives()
        w_NK = w_KN.detach().float().t().contiguous()
        block = (1, self.group)
        scale, _ = qp.choose_qparams_affine(
            _clipped(w_NK, clip_NG, self.group),
            qp.MappingType.SYMMETRIC,
            block,
            torch.int8,
            scale_dtype=torch.float32,
        )
        scale = scale.view(w_NK.shape[0], -1)
        zero = torch.zeros_like(scale, dtype=torch.int32)  # symmetric: not stored
        getattr(self, f"{name}_q")[slot].copy_(
            qp.quantize_affine(w_NK, block, scale, zero, torch.int8)
        )
        getattr(self, f"{name}_scale")[slot].copy_(scale)

    def _weight_NK(self, slot: int, name: str) -> Tensor:
        qp = torchao_primitives()
        q, scale = getattr(self, f"{name}_q")[slot], getattr(self, f"{name}_scale")[slot]
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return qp.dequantize_affine(
            q, (1, self.group), scale, zero, torch.int8, output_dtype=torch.float32
        )

    def linear(self, slot: int, name: str, x_nK: Tensor) -> Tensor:
        return x_nK @ self._weight_NK(slot, name).t()

    def dequantized(self, slot: int, name: str) -> Tensor:
        return self._weight_NK(slot, name).t().contiguous()


class Int4Bank(ExpertBank):
    """Asymmetric group-wise int4 (tinygemm scheme): packed by PyTorch's CPU int4 kernel, whose
    matmul reads the packed bytes directly."""

    fmt, bits = "int4", 4

    def __init__(self, n: int, shapes: dict[str, tuple[int, int]], group: int) -> None:
        super().__init__(n, shapes, group)
        for name, (out, inp) in shapes.items():
            self.register_buffer(f"{name}_packed", torch.zeros(n, out, inp // 2, dtype=torch.uint8))
            # scale and zero point per (group, output), the kernel's [K/group, N, 2] layout
            self.register_buffer(
                f"{name}_scale_zero", torch.zeros(n, inp // group, out, 2, dtype=torch.bfloat16)
            )

    def set_(self, slot: int, name: str, w_KN: Tensor, clip_NG: Tensor | None = None) -> None:
        qp = torchao_primitives()
        from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

        w_NK = w_KN.detach().float().t().contiguous()
        block = [1, self.group]
        scale, zero = qp._choose_qparams_affine_tinygemm(
            _clipped(w_NK, clip_NG, self.group),
            qp.MappingType.ASYMMETRIC,
            block,
            torch.int32,
            0,
            15,
            1e-6,
            None,
            torch.float32,
        )
        # the grid the kernel will use (bf16 scale and zero), values rounded onto it in fp32
        scale, zero = (t.to(torch.bfloat16).float() for t in (scale, zero))
        groups = (w_NK.shape[0], w_NK.shape[1] // self.group)  # [N, K/group], even for one group
        scale, zero = scale.reshape(groups), zero.reshape(groups)
        q = qp._quantize_affine_tinygemm(w_NK, block, scale, zero, torch.int32, 0, 15)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        getattr(self, f"{name}_packed")[slot].copy_(packed)
        getattr(self, f"{name}_scale_zero")[slot].copy_(
            pack_tinygemm_scales_and_zeros(
                scale.to(torch.bfloat16), zero.to(torch.bfloat16), torch.bfloat16
            )
        )

    def linear(self, slot: int, name: str, x_nK: Tensor) -> Tensor:
        if x_nK.device.type != "cpu":
            raise ValueError("expert_quant: 'int4' experts run on CPU only (PyTorch's CPU kernel)")
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x_nK.to(torch.bfloat16).contiguous(),
            getattr(self, f"{name}_packed")[slot],
            self.group,
            getattr(self, f"{name}_scale_zero")[slot],
        ).float()

    def dequantized(self, slot: int, name: str) -> Tensor:
        # the kernel itself applied to the identity: exactly the weight the forward multiplies by
        inp = self.shapes[name][1]
        return self.linear(slot, name, torch.eye(inp))


BANKS: dict[str, type[ExpertBank]] = {b.fmt: b for b in (FloatBank, Int8Bank, Int4Bank)}
