"""Hugging Face in and out: export moelab runs to ``transformers``, convert ``transformers`` MoE
models (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE) into moelab and switch them to ReLU routing,
upcycle dense models into MoEs (see ``docs/hf.md``).

``transformers`` is optional (the ``hf`` extra): this package imports without it; only loading an
export with ``transformers`` and converting a ``transformers`` model need it.
"""

from moelab.hf.export import export_model, export_run

__all__ = ["export_model", "export_run"]
