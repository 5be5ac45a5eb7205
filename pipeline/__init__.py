"""inversa: dataset augmentation by diffusion inversion and text-driven editing.

Reading a job's output from Python (imported on first use, so `import pipeline` stays light):

    import pipeline
    edits = pipeline.open_table("out/", "edits")      # a DuckDB relation
    pipeline.connect("out/").sql("select ...")         # views edits, sources, errors
    pipeline.export_output("out/", "train/", "webdataset", originals_ratio=0.5, seed=0)
"""

from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {"connect": "pipeline.report", "open_table": "pipeline.report", "export_output": "pipeline.export"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
