"""Evaluation: validation loss / perplexity (overall and per domain) and text generation."""

from moelab.eval.generation import generate_text
from moelab.eval.perplexity import autocast_context, evaluate
from moelab.eval.run import check_same_tokenizer, evaluate_run

__all__ = ["autocast_context", "check_same_tokenizer", "evaluate", "evaluate_run", "generate_text"]
