"""Evaluation: held-out perplexity of PyTorch models and of GGUF files run by the CPU engine."""

from wrinklefree.eval.perplexity import Perplexity, engine_perplexity, heldout_sequences, model_perplexity

__all__ = ["Perplexity", "engine_perplexity", "heldout_sequences", "model_perplexity"]
