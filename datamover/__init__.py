"""datamover: deduplicated, packed, path-preserving data movement between sites and one store."""

__version__ = "0.1.0"
