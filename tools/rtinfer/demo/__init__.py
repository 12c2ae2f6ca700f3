"""Synthetic fraud data and the demo models trained on it (no downloads, fixed seeds)."""
