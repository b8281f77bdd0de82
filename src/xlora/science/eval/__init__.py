"""Evaluating a checkpoint: test sets, checked decoding, scorecards, statistics with intervals."""
