"""Flax model definitions and checkpoint loaders."""
