"""`xlora reproduce`: data splits, expert and gate training, evaluation, in one recorded run."""
