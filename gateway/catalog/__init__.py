"""The model catalog in PostgreSQL: reads (the in-memory snapshot), writes (shadows, swaps,
rollout bookkeeping), migrations and their runner."""
