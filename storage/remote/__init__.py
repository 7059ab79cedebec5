"""A registry reached over the OCI distribution HTTP API, with storage/'s interface."""
