"""Inference engines. Each is a built-in plugin registered through ``register_engines``."""
