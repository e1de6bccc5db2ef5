"""Privacy (METHOD.md §8): gradient-inversion attacks on client updates (``attack``) and
differentially private uploads with an ε accountant (``dp``)."""
