"""Find the result document a finished run wrote under the experiment's results URI (S3)."""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Optional

from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError
from pydantic import ValidationError

from djinn.results import ResultDocument
from djinn.spec import OutputSpec
from djinn.storage import open_store

from .plan import Result, StoreProblem
from .status import Run

STORE_ERRORS = (BotoCoreError, ClientError)
RETRYABLE_STATUS = (408, 429)  # with 5xx: S3 busy or throttling, worth waiting for
# the operator's reads hold a reconcile (and a thread of the loop's pool): a store that does not answer must
# cost seconds, not boto3's 60 s x 5 attempts; the next reconcile tries again
QUICK = {"connect_timeout": 5, "read_timeout": 10, "attempts": 2}

STAMP = "%Y%m%dT%H%M%S%fZ"  # djinn.results.timestamp(): 22 characters, then "-<hex>"
CLOCK_SLACK = timedelta(seconds=60)


def pick_key(keys: list[str], run: Run) -> Optional[str]:
    """Newest ``results/<baseline>/<stamp>[_n<N>].json`` of this run, not older than its start."""
    suffix = f"_n{run.n}.json" if run.n is not None else ".json"
    since = ""
    if run.started_at:
        since = (datetime.fromisoformat(run.started_at.replace("Z", "+00:00")) - CLOCK_SLACK).strftime(STAMP)
    ok = [k for k in keys
          if k.startswith(f"results/{run.baseline}/") and k.endswith(suffix)
          and (run.n is not None or "_n" not in k.rsplit("/", 1)[1])
          and k.rsplit("/", 1)[1][:len(since)] >= since]
    return max(ok, key=lambda k: k.rsplit("/", 1)[1], default=None)


def find(results_uri: str, output: OutputSpec, run: Run) -> Optional[Result]:
    """Blocking (boto3): call it in a thread. None when the run left no valid document."""
    store = open_store(results_uri, output.endpoint_url, output.region, **QUICK)
    key = pick_key(store.list(f"results/{run.baseline}/"), run)
    if key is None:
        return None
    try:
        doc = ResultDocument.model_validate_json(store.get_bytes(key))
    except ValidationError:
        return None
    if doc.baseline != run.baseline or doc.n_agents != run.n:  # another run's document under this run's name
        return None
    return Result(key=key, oom=doc.oom, error=None if doc.oom else doc.error)


def probe(results_uri: str, output: OutputSpec) -> None:
    """Blocking: list one key under the results URI, raising what S3 answers (no bucket, access denied...)."""
    open_store(results_uri, output.endpoint_url, output.region, **QUICK).list("", limit=1)


def store_problem(exc: Exception) -> StoreProblem:
    """One line for an S3 failure, and whether waiting can fix it: a store that refused (no such bucket,
    access denied, bad region or credentials) will refuse again; an unreachable or busy one may come back."""
    if isinstance(exc, ClientError):
        err, meta = exc.response.get("Error", {}), exc.response.get("ResponseMetadata", {})
        status = int(meta.get("HTTPStatusCode") or 0)
        text = f"{err.get('Code') or status}: {err.get('Message') or exc}"
        return StoreProblem(" ".join(text.split()), 400 <= status < 500 and status not in RETRYABLE_STATUS)
    transient = isinstance(exc, (ConnectionError, HTTPClientError))
    return StoreProblem(" ".join(f"{type(exc).__name__}: {exc}".split()), permanent=not transient)
