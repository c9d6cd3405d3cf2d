"""The UNICOM networks: registry, architecture, weights, transforms and the model factory."""
