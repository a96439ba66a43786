"""Read result documents from a store and pick one per (experiment, baseline, N).

Only ``results/<baseline>/*.json`` keys are read.  A file that does not parse or
does not validate as a :class:`djinn.results.ResultDocument` is skipped with a
warning; one bad file never stops the analysis.  When a baseline has several
documents for the same N (a rerun), the newest ``created_at`` wins and the
others are reported as superseded.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterable, Optional

from pydantic import ValidationError

from djinn.results import ResultDocument

log = logging.getLogger(__name__)

RESULTS_PREFIX = "results/"


class AnalysisError(Exception):
    """A problem the user can act on; ``str()`` is a one-line message, ``exit_code`` for the CLI."""

    exit_code = 1


class NoResultsError(AnalysisError):
    exit_code = 2


@dataclass(frozen=True)
class Entry:
    """One result document and the key it was read from."""

    key: str
    doc: ResultDocument


@dataclass
class LoadedResults:
    uri: str
    entries: list[Entry]                     # selected documents, sorted by experiment, baseline, N
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)      # keys that did not parse
    superseded: list[str] = field(default_factory=list)   # keys replaced by a newer rerun

    @property
    def agent(self) -> dict[str, dict[int, ResultDocument]]:
        """baseline -> N -> agent-scaling document."""
        out: dict[str, dict[int, ResultDocument]] = {}
        for e in self.entries:
            if e.doc.experiment == "agent_scaling":
                out.setdefault(e.doc.baseline, {})[e.doc.n_agents] = e.doc
        return out

    @property
    def decode(self) -> dict[str, ResultDocument]:
        """baseline (decode mode) -> decode document."""
        return {e.doc.baseline: e.doc for e in self.entries if e.doc.experiment == "decode"}


def is_result_key(key: str) -> bool:
    parts = key.split("/")
    return len(parts) == 3 and parts[0] + "/" == RESULTS_PREFIX and parts[2].endswith(".json") and parts[1] != ""


def parse_document(key: str, data: bytes) -> ResultDocument:
    """Parse one result document; raises ValueError with a short reason."""
    try:
        return ResultDocument.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())) or "document"
        raise ValueError(f"not a result document ({exc.error_count()} error(s), first: {where}: "
                         f"{first.get('msg', exc)})") from None


def _created(doc: ResultDocument):
    try:
        return datetime.fromisoformat(doc.created_at.replace("Z", "+00:00")).timestamp()
    except (ValueError, TypeError):
        return float("-inf")


def select_documents(entries: Iterable[Entry]) -> tuple[list[Entry], list[str], list[str]]:
    """Keep one document per (experiment, baseline, N): the newest.

    Returns (selected entries sorted, superseded keys, warnings).
    """
    chosen: dict[tuple, Entry] = {}
    superseded: list[str] = []
    warnings: list[str] = []
    for e in entries:
        d = e.doc
        if d.experiment == "agent_scaling" and d.n_agents is None:
            warnings.append(f"{e.key}: agent_scaling document without n_agents; skipped")
            continue
        slot = (d.experiment, d.baseline, d.n_agents if d.experiment == "agent_scaling" else None)
        old = chosen.get(slot)
        if old is None:
            chosen[slot] = e
            continue
        newer, older = (e, old) if (_created(d), e.key) > (_created(old.doc), old.key) else (old, e)
        chosen[slot] = newer
        superseded.append(older.key)
        n = f" N={slot[2]}" if slot[2] is not None else ""
        warnings.append(f"{older.key}: superseded by newer {newer.key} ({d.experiment} {d.baseline}{n})")
    selected = sorted(chosen.values(), key=lambda e: (e.doc.experiment, e.doc.baseline, e.doc.n_agents or 0))
    return selected, superseded, warnings


def load_results(store, uri: Optional[str] = None) -> LoadedResults:
    """Read every ``results/<baseline>/*.json`` in ``store`` (LocalStore/S3Store)."""
    uri = uri or getattr(store, "uri", "?")
    try:
        keys = [k for k in store.list(RESULTS_PREFIX) if is_result_key(k)]
    except Exception as exc:  # botocore errors, permissions: one clear line
        raise AnalysisError(f"input: cannot list {uri}: {_one_line(exc)}") from exc
    parsed: list[Entry] = []
    skipped: list[str] = []
    warnings: list[str] = []
    for key in keys:
        try:
            doc = parse_document(key, store.get_bytes(key))
        except Exception as exc:  # unreadable or unparseable: warn and go on
            skipped.append(key)
            warnings.append(f"{key}: skipped: {_one_line(exc)}")
            continue
        folder = key.split("/")[1]
        if folder != doc.baseline:
            warnings.append(f"{key}: baseline {doc.baseline!r} differs from its folder {folder!r}; "
                            f"using {doc.baseline!r}")
        parsed.append(Entry(key, doc))
    selected, superseded, more = select_documents(parsed)
    warnings += more
    for w in warnings:
        log.warning("%s", w)
    if not selected:
        extra = f" ({len(skipped)} file(s) skipped as unreadable)" if skipped else ""
        raise NoResultsError(f"input: no result documents under {uri}; run the experiment first{extra}")
    return LoadedResults(uri=uri, entries=selected, warnings=warnings, skipped=skipped, superseded=superseded)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
