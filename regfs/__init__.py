"""regfs: a Linux filesystem view of a container registry (FUSE daemon and command line)."""
