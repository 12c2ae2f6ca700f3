"""The prediction path behind every door: service, Triton client, canary split, fallback, shadow
mirror, endpoint guard and per-model health."""
