"""tpu_lm: a JAX research codebase for Transformer language models.

Importing the package has no side effects; the commands (main, generate, serve)
set up their process themselves.
"""
