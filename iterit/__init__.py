"""iterit: iterative, selective instruction tuning (IterIT, arXiv 2412.17365) on Ray."""

__version__ = "0.1.0"
