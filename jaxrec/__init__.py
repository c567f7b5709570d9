"""jaxrec: sequential recommendation in JAX/Flax at accelerator scale."""

__version__ = "0.1.0"
