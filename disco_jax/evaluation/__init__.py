"""Evaluation of a trained colorizer: the metrics and the loop over an evaluation split."""
