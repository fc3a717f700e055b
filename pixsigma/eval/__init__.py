"""Evaluating a model: prompt adherence on the toy world (:mod:`pixsigma.eval.adherence`)."""

from pixsigma.eval.adherence import evaluate_adherence, evaluate_model, load_prompt_set

__all__ = ["evaluate_adherence", "evaluate_model", "load_prompt_set"]
