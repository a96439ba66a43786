"""Analysis of djinn-bench result documents: CSV, Table 2, Figure 6, claims, decode plot.

``analyze(input_uri)`` reads every ``results/<baseline>/*.json`` under a local
directory or ``s3://bucket/prefix`` and writes the artifacts under
``<output>/analysis/``.  The pieces are usable on their own:

- :mod:`djinn_analysis.load`    read and select result documents (thin I/O)
- :mod:`djinn_analysis.tables`  CSV rows and Table 2 (pure)
- :mod:`djinn_analysis.claims`  the experiment's claims, PASS/FAIL/N/A (pure)
- :mod:`djinn_analysis.figures` Figure 6 and the decode-mode plot (PNG/PDF bytes)
- :mod:`djinn_analysis.report`  ``analyze()``: wires the above to a store
"""
from .load import AnalysisError, LoadedResults, NoResultsError, load_results
from .report import analyze

__all__ = ["analyze", "load_results", "LoadedResults", "AnalysisError", "NoResultsError"]
