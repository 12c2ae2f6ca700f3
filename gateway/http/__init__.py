"""The HTTP doors of the gateway: the app factory, route modules, ingress and responses."""
