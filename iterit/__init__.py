"""iterit: iterative, selective instruction tuning (IterIT, arXiv 2412.17365) on Ray.

The Python API (docs/api.md): iterit.ingest, iterit.score (a lazy ray.data.Dataset), iterit.select,
iterit.export and iterit.run; each imports its heavy dependencies only when called."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["ingest", "score", "select", "export", "run", "__version__"]
API = frozenset(__all__) - {"__version__"}


def __getattr__(name: str):
    # Loaded on first use (PEP 562), not at `import iterit`: iterit.api needs pydantic (the config), and
    # the GPU check imports iterit.scoring.losses on a machine that has torch and transformers only.
    if name in API:
        return getattr(importlib.import_module("iterit.api"), name)
    raise AttributeError(f"module 'iterit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | API)
