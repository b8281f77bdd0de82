"""Proteins: structures and sequences from installed packages, their labels, splits and oracles."""
