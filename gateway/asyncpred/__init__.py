"""Async predictions: the REST door, job messages, the worker, results, tokens, offsets and
signed callbacks."""
