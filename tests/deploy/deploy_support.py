"""Shared helpers of the deployment tests: the repository paths, a Helm renderer, value profiles.

Helm comes from the ``helm-python-sdk`` package (the Helm v4 Go SDK, bundled as a shared library in
the wheel: ``pip install helm-python-sdk==0.2.2``), else from a ``helm`` binary on PATH; tests that
render skip with that install hint when neither is there.
"""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "djinn-bench"
CRD_NAME = "agentscalingexperiments.djinn.io.yaml"
TOP_CRD = ROOT / "crds" / CRD_NAME
CHART_CRD = CHART / "crds" / CRD_NAME
PROFILES = {"default": None, "kind": CHART / "values-kind.yaml", "eks-a100": CHART / "values-eks-a100.yaml"}
HELM_HINT = ("no Helm: pip install helm-python-sdk==0.2.2 (Helm v4 SDK in a wheel, no binary download) "
             "or put a helm binary on PATH")

if str(ROOT / "operator") not in sys.path:
    sys.path.insert(0, str(ROOT / "operator"))


def deep_merge(base: dict, override: dict) -> dict:
    """Helm's coalescing of -f files and --set values: maps merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def profile_values(profile: str, **overrides: Any) -> dict:
    path = PROFILES[profile]
    values = yaml.safe_load(path.read_text()) if path else {}
    return deep_merge(values or {}, overrides)


class Helm:
    """Renders and schema-checks the chart with the Helm Go SDK (helm_python) or a helm binary."""

    def __init__(self):
        self.sdk = None
        self.binary = None
        try:
            import helm_python

            self.sdk = helm_python
        except Exception:  # ImportError, or the native library failing to load
            self.binary = shutil.which("helm")
        if self.sdk is None and self.binary is None:
            raise LookupError(HELM_HINT)

    @property
    def error(self) -> type[BaseException]:
        return self.sdk.HelmError if self.sdk else subprocess.CalledProcessError

    def render(self, values: Optional[dict] = None, *, name: str = "djinn-bench",
               namespace: str = "djinn") -> dict[str, str]:
        """Template path -> rendered text, like ``helm template`` (hooks and NOTES.txt included)."""
        values = values or {}
        if self.sdk:
            with self.sdk.Chart.load(str(CHART)) as chart:
                return chart.render(values, name=name, namespace=namespace, is_install=True)
        out = self._run("template", name, str(CHART), "--namespace", namespace, "--values", "-",
                        "--render-subchart-notes", values=values)
        texts: dict[str, str] = {}
        for doc in out.split("\n---\n"):
            first = doc.strip().splitlines()[0] if doc.strip() else ""
            if first.startswith("# Source: "):
                key = first[len("# Source: "):]
                texts[key] = texts.get(key, "") + "\n---\n" + doc
        return texts

    def validate_schema(self, values: dict) -> None:
        """Raise self.error if values.schema.json rejects ``values``."""
        if self.sdk:
            with self.sdk.Chart.load(str(CHART)) as chart:
                chart.validate_schema(values)
        else:
            self._run("lint", str(CHART), "--values", "-", "--quiet", values=values)

    def lint(self, values: dict) -> list[str]:
        """Errors and warnings of ``helm lint --strict``."""
        if self.sdk:
            report = self.sdk.lint(str(CHART), values, strict=True, namespace="djinn",
                                   kube_version="v1.30.0")
            return [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2] \
                + list(report.get("errors") or [])
        try:
            self._run("lint", str(CHART), "--strict", "--values", "-", values=values)
        except subprocess.CalledProcessError as exc:
            return [exc.stdout + exc.stderr]
        return []

    def _run(self, *args: str, values: dict) -> str:
        proc = subprocess.run([self.binary, *args], input=json.dumps(values), text=True,
                              capture_output=True, timeout=120)
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, args, proc.stdout, proc.stderr)
        return proc.stdout

def objects_of(rendered: dict[str, str]) -> list[dict]:
    """The Kubernetes objects of a render, NOTES.txt left out."""
    objs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                assert isinstance(doc, dict), f"{path}: a YAML document that is not an object: {doc!r}"
                objs.append(doc)
    return objs
