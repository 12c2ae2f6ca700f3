"""The Triton model repository on disk: layout, model configs and rendering."""
