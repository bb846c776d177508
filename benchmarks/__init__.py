"""snapfs benchmark suite (see README.md)."""
