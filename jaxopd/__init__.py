"""jaxopd: LM alignment and distillation as policy distillation, in JAX."""
__version__ = "0.1.0"
