"""Fixtures of the deployment tests (helpers in deploy_support.py)."""
from __future__ import annotations

import tomllib
from typing import Any, Callable

import pytest
import yaml

from deploy_support import ROOT, TOP_CRD, Helm, objects_of, profile_values


@pytest.fixture(scope="session")
def helm() -> Helm:
    try:
        return Helm()
    except LookupError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def render(helm) -> Callable[..., list[dict]]:
    """render(profile, **overrides) -> the objects of ``helm template`` with that profile's values."""
    def _render(profile: str = "default", namespace: str = "djinn", **overrides: Any) -> list[dict]:
        return objects_of(helm.render(profile_values(profile, **overrides), namespace=namespace))
    return _render


@pytest.fixture(scope="session")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="session")
def api_calls() -> set[tuple[str, str, str]]:
    """djinn_operator.k8s.API_CALLS, the operator's own list of the Kubernetes calls it makes."""
    from djinn_operator.k8s import API_CALLS

    return {(g, r, v) for g, r, v in API_CALLS}


@pytest.fixture(scope="session")
def crd() -> dict:
    return yaml.safe_load(TOP_CRD.read_text())
