"""Privacy: gradient-inversion attacks on client updates (METHOD.md §8)."""
