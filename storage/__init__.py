"""Registry storage: the on-disk layout of the distribution registry, as a Python (trio) library."""
