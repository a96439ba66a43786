"""Container images mapped to this machine's install of the package.

An image reference resolves to the repository's Dockerfile that builds it (what kind-up.sh and
the push script build); the final stage's ENV, WORKDIR, ENTRYPOINT and CMD apply to the pod, with
the image's paths mapped to local ones: /opt/venv/bin is the running interpreter's bin directory
(where pip put ``djinn-bench``, ``ray`` and ``python``), /opt/djinn/configs the repository's
configs, /home/djinn the pod's own home directory. An image no Dockerfile builds fails like a pull would.
"""
from __future__ import annotations

import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {  # image name (last path component, no tag) -> Dockerfile
    "djinn-bench": ROOT / "Dockerfile",
    "djinn-runner": ROOT / "images" / "runner.Dockerfile",
    "djinn-server": ROOT / "images" / "server.Dockerfile",
    "djinn-operator": ROOT / "images" / "operator.Dockerfile",
}
PATHS = {"/opt/venv/bin": str(Path(sys.executable).parent), "/opt/djinn/configs": str(ROOT / "configs")}
IMAGE_HOME = "/home/djinn"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ImagePullError(LookupError):
    """No Dockerfile of the repository builds this image."""


@dataclass(frozen=True)
class Image:
    ref: str
    env: dict[str, str]
    workdir: str
    entrypoint: list[str]
    cmd: list[str]


def _local(value: str, home: str) -> str:
    for image_path, local in {**PATHS, IMAGE_HOME: home}.items():
        value = value.replace(image_path, local)
    return value


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.M)]


def _exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else ["/bin/sh", "-c", args]


def parse_final_stage(dockerfile: Path) -> tuple[dict[str, str], str, list[str], list[str]]:
    """ENV (with $VAR expanded), WORKDIR, ENTRYPOINT, CMD of the last stage."""
    env: dict[str, str] = {"PATH": BASE_PATH}
    workdir, entrypoint, cmd = "/", [], []
    for op, args in _instructions(dockerfile.read_text()):
        if op == "FROM":
            env, workdir, entrypoint, cmd = {"PATH": BASE_PATH}, "/", [], []
        elif op == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), value)
        elif op == "WORKDIR":
            workdir = args
        elif op == "ENTRYPOINT":
            entrypoint = _exec_form(args)
        elif op == "CMD":
            cmd = _exec_form(args)
    return env, workdir, entrypoint, cmd


def resolve(ref: str, home: str) -> Image:
    """The image ``ref`` as it runs here, its home directory at ``home``."""
    name = ref.rsplit("/", 1)[-1].split("@")[0].split(":")[0]
    dockerfile = DOCKERFILES.get(name)
    if dockerfile is None:
        raise ImagePullError(f'image "{ref}": no Dockerfile of the repository builds it')
    env, workdir, entrypoint, cmd = parse_final_stage(dockerfile)
    return Image(ref, {k: _local(v, home) for k, v in env.items()}, _local(workdir, home), entrypoint, cmd)
