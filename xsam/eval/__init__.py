"""Evaluation metrics as mergeable accumulators (semantic, instance, referring, GCG, interactive)."""
