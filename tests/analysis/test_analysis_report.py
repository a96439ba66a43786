"""analyze() end to end on a local directory, and the CLI."""
import csv
import json
import subprocess
import sys

import pytest

from analysis_testdata import decode_docs, scaling_docs, write_docs
from djinn_analysis import analyze
from djinn_analysis.__main__ import main
from djinn_analysis.figures import decode_figure, decode_stats, figure6, render
from djinn_analysis.tables import table2
from djinn_analysis.load import Entry, select_documents

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes):
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_analyze_writes_all_artifacts(tmp_path):
    write_docs(tmp_path, scaling_docs() + decode_docs())
    (tmp_path / "results" / "djinn_agents" / "broken.json").write_text("{")
    out = analyze(str(tmp_path))
    assert set(out) == {"results.csv", "table2.md", "table2.csv", "figure6.png", "figure6.pdf",
                        "claims.json", "decode_modes.png"}
    for name, where in out.items():
        assert where == str(tmp_path / "analysis" / name)
    w, h = png_size((tmp_path / "analysis" / "figure6.png").read_bytes())
    assert w > 600 and h > 400
    png_size((tmp_path / "analysis" / "decode_modes.png").read_bytes())
    assert (tmp_path / "analysis" / "figure6.pdf").read_bytes()[:5] == b"%PDF-"
    claims = json.loads((tmp_path / "analysis" / "claims.json").read_text())
    assert claims["skipped_files"] == ["results/djinn_agents/broken.json"]
    by_id = {c["id"]: c for c in claims["claims"]}
    # Djinn never failed up to N=8: 8 / 2 is a lower bound below 20, which decides nothing
    assert by_id["tenant_density"]["status"] == "N/A" and by_id["tenant_density"]["value"] is None
    assert by_id["latency_ratio"]["status"] == "PASS"
    assert by_id["djinn_p99_n32"]["status"] == "N/A"
    assert claims["summary"] == {"PASS": 2, "FAIL": 0, "N/A": 3}
    fd = [m for m in claims["decode_modes"] if m["mode"] == "full_djinn"][0]
    assert fd["bytes_per_token"] == pytest.approx((0.001 + 0.0005) * 1e6 / 50)  # 30 B/token
    assert fd["mean_per_token_ms"] == pytest.approx(21.0)
    with open(tmp_path / "analysis" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 66 + 12
    assert "| Djinn | 8 | ok | 16 |" in (tmp_path / "analysis" / "table2.md").read_text()
    table = list(csv.DictReader(open(tmp_path / "analysis" / "table2.csv")))
    assert {r["p99_from_fewer_than_100_steps"] for r in table} == {"True"}  # 2N steps, N <= 8
    # rerunning replaces the artifacts and leaves no temp files
    analyze(str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "analysis").iterdir()) == sorted(out)


def test_separate_output_and_agent_only_input(tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    write_docs(src, scaling_docs())
    out = analyze(str(src), str(dst))
    assert "decode_modes.png" not in out and not (src / "analysis").exists()
    assert (dst / "analysis" / "figure6.png").exists()


def test_decode_only_input_skips_figure6(tmp_path):
    write_docs(tmp_path, decode_docs())
    out = analyze(str(tmp_path))
    assert "decode_modes.png" in out and "figure6.png" not in out
    claims = json.loads((tmp_path / "analysis" / "claims.json").read_text())
    assert claims["summary"] == {"PASS": 0, "FAIL": 0, "N/A": 5}


def test_figures_render_with_failed_runs():
    from analysis_testdata import agent_doc
    docs = scaling_docs() + [agent_doc("djinn_agents", 16, 0, 0, error="timeout"),
                             agent_doc("ray_serverless", 1, 0, 0, oom=True, error="OOM")]
    agent = {}
    for d in docs:
        agent.setdefault(d.baseline, {})[d.n_agents] = d
    png_size(render(figure6(table2(agent)), "png"))
    png_size(render(figure6([]), "png"))
    entries, _, _ = select_documents(Entry(f"results/{d.baseline}/x.json", d) for d in decode_docs())
    png_size(render(decode_figure(decode_stats({e.doc.baseline: e.doc for e in entries})), "png"))


def test_cli_empty_input_exits_2(tmp_path, capsys):
    assert main(["--input", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: input: no result documents under {tmp_path}; run the experiment first"


def test_cli_as_module(tmp_path):
    write_docs(tmp_path, scaling_docs())
    (tmp_path / "results" / "ray_serverless" / "bad.json").write_text("[]")
    p = subprocess.run([sys.executable, "-m", "djinn_analysis", "--input", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert f"figure6.png: {tmp_path / 'analysis' / 'figure6.png'}" in p.stdout
    assert "warning: results/ray_serverless/bad.json: skipped" in p.stderr
    p = subprocess.run([sys.executable, "-m", "djinn_analysis", "--input", str(tmp_path / "empty")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "input: no result documents under" in p.stderr


def test_figure6_marks_a_p99_of_few_steps_hollow():
    from analysis_testdata import agent_doc

    def legend(docs):
        rows = table2({d.baseline: {d.n_agents: d} for d in docs})
        return [t.get_text() for t in figure6(rows).axes[0].get_legend().get_texts()]
    assert "hollow: p99 of fewer than 100 steps" in legend([agent_doc("djinn_agents", 4, 100, 10)])  # 8 steps
    assert legend([agent_doc("djinn_agents", 4, 100, 10, iterations=13)]) == ["Djinn"]  # 104 steps
