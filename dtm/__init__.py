"""dtm: Divergent Token Metrics for compressed Llama models in JAX/Flax."""

__version__ = "0.1.0"
