"""Building blocks of a model version swap: validate, materialize, load, smoke test.

See ``docs/lifecycle.md`` for the swap procedure these steps belong to.
"""
