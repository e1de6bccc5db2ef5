"""Experiment presets and study entry points (see presets.py)."""
