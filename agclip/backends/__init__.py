"""Framework adapters. Each is imported on demand: ``agclip.backends.torch``,
``agclip.backends.jax`` and ``agclip.backends.numpy``."""
