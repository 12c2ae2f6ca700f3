"""Async predictions: the door's logic, job messages, the worker, results, tokens, offsets and
signed callbacks (the HTTP routes are ``gateway/http/async_predict.py``)."""
