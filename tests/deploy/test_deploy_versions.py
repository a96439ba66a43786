"""scripts/versions.env is the one place versions are chosen; everything that repeats one must agree."""
from __future__ import annotations

import re

from deploy_support import ROOT

VERSIONS = {k.strip(): v.split("#")[0].strip() for k, _, v in
            (line.partition("=") for line in (ROOT / "scripts" / "versions.env").read_text().splitlines())
            if k.strip() and not k.startswith("#") and v}


def arg(path: str, name: str) -> list[str]:
    return re.findall(rf"^ARG {name}=(\S+)$", (ROOT / path).read_text(), re.M)


def test_versions_file_names_every_pin():
    assert set(VERSIONS) == {"PYTHON_IMAGE", "CUDA_IMAGE", "TORCH_CPU", "TORCH_GPU", "RAY_VERSION", "KUBERAY_VERSION",
                             "EKS_VERSION"}


def test_dockerfiles_use_the_pinned_versions():
    for path in ("Dockerfile", "images/server.Dockerfile", "images/runner.Dockerfile", "images/operator.Dockerfile"):
        assert arg(path, "PYTHON_IMAGE") == [VERSIONS["PYTHON_IMAGE"]], path
    assert arg("images/server.Dockerfile", "CUDA_IMAGE") == [VERSIONS["CUDA_IMAGE"]]
    assert arg("images/server.Dockerfile", "TORCH_VERSION") == [VERSIONS["TORCH_GPU"]]
    for path in ("Dockerfile", "images/runner.Dockerfile"):
        assert arg(path, "TORCH_VERSION") == [VERSIONS["TORCH_CPU"]], path
    for path in ("Dockerfile", "images/server.Dockerfile", "images/runner.Dockerfile"):
        assert arg(path, "RAY_VERSION") == [VERSIONS["RAY_VERSION"]], path


def test_scripts_and_docs_use_the_pinned_versions():
    kind_up = (ROOT / "scripts" / "kind-up.sh").read_text()
    assert f'KUBERAY_VERSION="${{KUBERAY_VERSION:-{VERSIONS["KUBERAY_VERSION"]}}}"' in kind_up
    readme, doc = (ROOT / "README.md").read_text(), (ROOT / "docs" / "kubernetes.md").read_text()
    for text in (readme, doc):
        assert set(re.findall(r"kuberay/kuberay-operator --version (\S+)", text)) == {VERSIONS["KUBERAY_VERSION"]}
    assert re.findall(r'^  version: "([0-9.]+)"', doc, re.M) == [VERSIONS["EKS_VERSION"]]
    assert set(re.findall(r"pip install torch==(\S+)", readme)) == {VERSIONS["TORCH_CPU"]}
