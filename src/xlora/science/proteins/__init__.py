"""Protein mechanics: real structures from installed packages, an anisotropic network model, mechanics labels."""
