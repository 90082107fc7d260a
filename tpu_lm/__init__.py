"""tpu_lm: a JAX research codebase for Transformer language models."""
