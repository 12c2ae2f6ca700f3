"""The service around Triton: HTTP doors, serving core, catalog, prediction log, async
predictions, the model lifecycle and the repository it renders (docs/architecture.md)."""
