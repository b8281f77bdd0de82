"""Proteins: structures and SCOPe sequences from installed packages, their labels, homology splits and oracles."""
