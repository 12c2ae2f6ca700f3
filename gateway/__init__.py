"""The HTTP gateway in front of Triton: validation, model catalog, canary routing, fallback."""
