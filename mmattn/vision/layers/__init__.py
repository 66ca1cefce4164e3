"""Attention modules, each usable on its own in any model."""
