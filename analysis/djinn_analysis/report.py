"""``analyze()``: read result documents from a store, write every artifact back (thin I/O)."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Optional

from djinn.storage import open_store

from . import claims as claims_mod
from .figures import decode_figure, decode_stats, figure6, render
from .load import AnalysisError, load_results
from .tables import RESULT_COLUMNS, result_rows, table2, table2_csv, table2_markdown, to_csv

ANALYSIS_PREFIX = "analysis/"


def build_artifacts(loaded) -> dict[str, bytes]:
    """Artifact name -> bytes, computed from loaded results (no I/O)."""
    rows = table2(loaded.agent)
    claims = claims_mod.evaluate(rows)
    out: dict[str, bytes] = {
        "results.csv": to_csv(result_rows(loaded.entries), RESULT_COLUMNS).encode(),
        "table2.md": table2_markdown(rows).encode(),
        "table2.csv": table2_csv(rows).encode(),
    }
    if rows:
        fig = figure6(rows)
        out["figure6.png"] = render(fig, "png")
        out["figure6.pdf"] = render(fig, "pdf")
    decode = loaded.decode
    dstats = decode_stats(decode) if decode else []
    if dstats:
        out["decode_modes.png"] = render(decode_figure(dstats), "png")
    doc = {
        "input": loaded.uri,
        "generated_at": datetime.now(timezone.utc).isoformat(),
        "summary": claims_mod.status_counts(claims),
        "claims": claims,
        "decode_modes": dstats,
        "documents": [e.key for e in loaded.entries],
        "skipped_files": loaded.skipped,
        "superseded_files": loaded.superseded,
        "warnings": loaded.warnings,
    }
    out["claims.json"] = (json.dumps(doc, indent=2) + "\n").encode()
    return out


def analyze(input_uri: str, output_uri: Optional[str] = None,
            endpoint_url: Optional[str] = None) -> dict[str, str]:
    """Analyze every ``results/<baseline>/*.json`` under ``input_uri``.

    Writes results.csv, table2.md, table2.csv, claims.json, and figure6.png/.pdf
    (when agent-scaling results exist) and decode_modes.png (when decode results
    exist) under ``<output_uri>/analysis/``; ``output_uri`` defaults to the input.
    Returns artifact name -> location.  Raises :class:`AnalysisError` (one-line
    message; :class:`NoResultsError` when there is nothing to analyze).
    """
    loaded = load_results(open_store(input_uri, endpoint_url), input_uri)
    artifacts = build_artifacts(loaded)
    out_uri = output_uri or input_uri
    store = open_store(out_uri, endpoint_url)
    written: dict[str, str] = {}
    # claims.json last: its presence means the rest of this analysis is in place
    for name in sorted(artifacts, key=lambda n: n == "claims.json"):
        try:
            written[name] = store.put_bytes(ANALYSIS_PREFIX + name, artifacts[name], overwrite=True)
        except Exception as exc:
            msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise AnalysisError(f"output: cannot write {ANALYSIS_PREFIX}{name} under {out_uri}: {msg}") from exc
    return written
