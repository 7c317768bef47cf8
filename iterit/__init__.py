"""iterit: iterative, selective instruction tuning (IterIT, arXiv 2412.17365) on Ray.

The Python API (docs/api.md): iterit.ingest, iterit.score (a lazy ray.data.Dataset), iterit.select,
iterit.export and iterit.run; each imports its heavy dependencies only when called."""

from iterit.api import export, ingest, run, score, select

__version__ = "0.1.0"
__all__ = ["ingest", "score", "select", "export", "run", "__version__"]
