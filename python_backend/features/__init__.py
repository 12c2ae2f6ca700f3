"""Online feature assembly: key schema, Redis store, hot-entity cache."""
