"""Evaluation: perplexity (and task metrics in sibling modules)."""
