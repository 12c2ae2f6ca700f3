"""The prediction store: the prediction log and its labels in ClickHouse (chdb locally)."""
