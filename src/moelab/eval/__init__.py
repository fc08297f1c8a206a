"""Evaluation: validation loss / perplexity (overall and per domain) and text generation.

Model-level only; evaluating a run directory is ``moelab.train.evaluate_run`` (it reads the run's
typed config, which lives in ``moelab.train``, and ``moelab.train`` evaluates with this package).
"""

from moelab.eval.generation import generate_text
from moelab.eval.perplexity import autocast_context, evaluate

__all__ = ["autocast_context", "evaluate", "generate_text"]
