"""Business logic that runs inside Triton python-backend models.

Every ``model.py`` under ``triton_models/`` is a thin shell: it parses its config, converts
tensors and calls the plain classes in this package, which tests import without Triton.
"""
