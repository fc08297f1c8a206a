"""Hugging Face in and out (``docs/hf.md``):

* :func:`export_run` / :func:`export_model`: a moelab run or model as a ``transformers`` directory
  (``moelab export-hf``), whose ``modeling_moelab.py`` :mod:`moelab.hf.gen_modeling` generates
  from moelab's own modules;
* :func:`convert`: a ``transformers`` Mixtral, OLMoE, Qwen2-MoE or Qwen3-MoE model (or sparse MoE
  block, or a dense Llama/Mistral/Qwen2) as moelab's, with identical outputs, optionally switched
  to ReMoE's ReLU routing (:func:`switch_to_relu`); :func:`convert_checkpoint` makes a run of a
  local checkpoint (``moelab convert-hf``);
* :func:`upcycle`: a dense model as an MoE whose experts start as copies of its FFNs;
  :func:`upcycle_run` makes a run of it (``moelab upcycle``);
* :func:`register_auto_classes`: load exports without ``trust_remote_code``.

``transformers`` is optional (the ``hf`` extra): this package imports without it; only loading
an export and converting a ``transformers`` model need it.
"""

from moelab.hf.convert import convert, switch_to_relu
from moelab.hf.export import export_model, export_run
from moelab.hf.runs import convert_checkpoint, start_run, upcycle_run
from moelab.hf.upcycle import upcycle


def register_auto_classes() -> None:
    """Register the exported model type (``moelab``) with ``transformers``' ``AutoConfig`` and
    ``AutoModelForCausalLM``, so exports load without ``trust_remote_code`` in this process."""
    import transformers

    from moelab.hf.gen_modeling import load_module

    modeling = load_module()
    transformers.AutoConfig.register("moelab", modeling.MoelabConfig, exist_ok=True)
    transformers.AutoModelForCausalLM.register(
        modeling.MoelabConfig, modeling.MoelabForCausalLM, exist_ok=True
    )


__all__ = [
    "convert",
    "convert_checkpoint",
    "export_model",
    "export_run",
    "register_auto_classes",
    "start_run",
    "switch_to_relu",
    "upcycle",
    "upcycle_run",
]
