"""Loading: bad files are skipped with a warning, reruns superseded, empty input is a clear error."""
import logging

import pytest

from analysis_testdata import agent_doc, scaling_docs, write_docs
from djinn.results import ResultDocument
from djinn.storage import LocalStore, put_json
from djinn_analysis.load import NoResultsError, load_results


def test_bad_files_are_skipped_and_warned(tmp_path, caplog):
    write_docs(tmp_path, scaling_docs())
    bad = tmp_path / "results" / "djinn_agents"
    (bad / "truncated.json").write_text('{"baseline": "djinn_agents", "experiment": "agent_sc')
    (bad / "wrong_schema.json").write_text('{"hello": "world"}')
    (bad / "notes.txt").write_text("not a result")
    (tmp_path / "results" / "stray.json").write_text("{}")  # not under results/<baseline>/
    with caplog.at_level(logging.WARNING, logger="djinn_analysis.load"):
        loaded = load_results(LocalStore(tmp_path))
    assert sorted(loaded.skipped) == ["results/djinn_agents/truncated.json", "results/djinn_agents/wrong_schema.json"]
    assert len(loaded.entries) == 11
    assert sorted(loaded.agent["djinn_agents"]) == [1, 2, 4, 8]
    assert loaded.agent["ray_keepalive"][4].oom
    assert any("truncated.json: skipped" in w for w in loaded.warnings)
    assert "wrong_schema.json" in caplog.text


def test_rerun_newest_wins(tmp_path):
    old = agent_doc("djinn_agents", 2, 100, 10, created_at="2025-01-01T00:00:00+00:00")
    new = agent_doc("djinn_agents", 2, 300, 30, created_at="2025-02-01T00:00:00+00:00")
    store = LocalStore(tmp_path)
    put_json(store, "results/djinn_agents/b_n2.json", old)   # key order opposite to time order
    put_json(store, "results/djinn_agents/a_n2.json", new)
    loaded = load_results(store)
    assert loaded.agent["djinn_agents"][2].steps[0].latency_ms == 300
    assert loaded.superseded == ["results/djinn_agents/b_n2.json"]


def test_empty_and_missing_input(tmp_path):
    with pytest.raises(NoResultsError) as exc:
        load_results(LocalStore(tmp_path / "nowhere"), str(tmp_path / "nowhere"))
    assert str(exc.value) == f"input: no result documents under {tmp_path / 'nowhere'}; run the experiment first"
    assert exc.value.exit_code == 2


def test_only_bad_files_is_no_results(tmp_path):
    (tmp_path / "results" / "x").mkdir(parents=True)
    (tmp_path / "results" / "x" / "a.json").write_text("nope")
    with pytest.raises(NoResultsError, match=r"run the experiment first \(1 file\(s\) skipped"):
        load_results(LocalStore(tmp_path))


def test_document_round_trip_is_the_runner_schema(tmp_path):
    keys = write_docs(tmp_path, [agent_doc("ray_keepalive", 4, 0, 0, oom=True, error="CUDA out of memory")])
    assert keys[0].endswith("_n4.json") and "/results/ray_keepalive/" in keys[0]
    doc = ResultDocument.model_validate_json(open(keys[0]).read())
    assert doc.oom and doc.steps == []
