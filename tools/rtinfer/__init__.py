"""Local tooling: stack control, model build and rendering, and the rtinfer CLI."""
