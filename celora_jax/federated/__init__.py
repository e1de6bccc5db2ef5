"""Federated simulation: client updates, server strategies and the round engine."""
