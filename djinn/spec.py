"""The one model of an agent-scaling experiment: CLI, CRD schema and operator all read it.

YAML documents are Kubernetes-shaped (``apiVersion: djinn.io/v1alpha1``,
``kind: AgentScalingExperiment``, ``spec: {...}``) with camelCase keys; a bare
``spec`` mapping is accepted too.
"""
from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic.alias_generators import to_camel

GROUP = "djinn.io"
VERSION = "v1alpha1"
KIND = "AgentScalingExperiment"
PLURAL = "agentscalingexperiments"
API_VERSION = f"{GROUP}/{VERSION}"


class SpecError(ValueError):
    """A spec that cannot run; the message is one line naming the field and the fix."""


class Baseline(str, Enum):
    native_pytorch = "native_pytorch"
    semantic_blind = "semantic_blind"
    partially_aware = "partially_aware"
    full_djinn = "full_djinn"
    ray_keepalive = "ray_keepalive"
    ray_serverless = "ray_serverless"
    djinn_agents = "djinn_agents"


DECODE_MODES = (Baseline.semantic_blind, Baseline.partially_aware, Baseline.full_djinn)
RAY_BASELINES = (Baseline.ray_keepalive, Baseline.ray_serverless)
AGENT_BASELINES = (Baseline.native_pytorch, Baseline.ray_keepalive, Baseline.ray_serverless, Baseline.djinn_agents)

MAX_AGENTS = 4096  # agents one run may start (agentCounts, djinnSweepCap)
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_UNITS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def parse_quantity(text: str) -> int:
    """Bytes of a Kubernetes-style quantity such as ``1.5Mi`` or ``80G``."""
    m = _QUANTITY.match(str(text).strip())
    if not m or len(m.group(1)) > 20:  # float() of a longer number can be inf: no quantity is that large
        raise ValueError(f"{str(text)[:40]!r} is not a quantity like 512Mi or 80Gi")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


_CPU = re.compile(r"^[0-9]+(\.[0-9]+)?$|^[0-9]+m$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_REGION = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# an image reference as the container runtimes parse it: [host[:port]/]path[:tag][@digest], path lowercase
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_IMAGE = re.compile(rf"^(?:{_HOST_PART}(?:\.{_HOST_PART})*(?::[0-9]+)?/)?{_PATH_PART}(?:/{_PATH_PART})*"
                    r"(?::\w[\w.-]{0,127})?(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$")
MAX_URI_BYTES = 512  # S3 keys are <= 1,024 bytes: the rest is namespace/name/results/<baseline>/<stamp>.json
MAX_AGENT_COUNTS = 64


def check_label_value(v: str, what: str) -> str:
    """A Kubernetes label value (also a toleration value): <= 63 of [-A-Za-z0-9_.], alphanumeric ends."""
    if len(v) > 63 or not _LABEL_VALUE.match(v):
        raise ValueError(f"{what} {v!r} is not a valid label value (<= 63 characters [-A-Za-z0-9_.], "
                         "starting and ending alphanumeric)")
    return v


def check_qualified_name(v: str, what: str) -> str:
    """A label key or taint key: an optional DNS-subdomain prefix and '/', then a name as a label value."""
    prefix, _, name = v.rpartition("/")
    if (not name or len(name) > 63 or not _LABEL_VALUE.match(name)
            or (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)))):
        raise ValueError(f"{what} {v!r} is not a qualified name like example.com/name "
                         "(name: <= 63 characters [-A-Za-z0-9_.], starting and ending alphanumeric)")
    return v


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              use_enum_values=False)


class OutputSpec(_Model):
    """Where result JSON and figures go: a local directory or ``s3://bucket/prefix``."""

    uri: str = Field(min_length=1, description="Local directory or s3://bucket/prefix")
    endpoint_url: Optional[str] = Field(None, description="S3 endpoint (MinIO, moto); AWS when unset")
    region: Optional[str] = Field(None, description="S3 region; the AWS default chain when unset")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        if len(v.encode()) > MAX_URI_BYTES:
            raise ValueError(f"longer than {MAX_URI_BYTES} bytes; use a shorter prefix")
        if v.startswith("s3://") and not v[5:].split("/", 1)[0]:
            raise ValueError("s3 URI needs a bucket: s3://bucket/prefix")
        if "://" in v and not v.startswith("s3://"):
            raise ValueError("only local paths and s3://bucket/prefix are supported")
        return v

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            scheme, sep, rest = v.partition("://")
            host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
            port = host.rpartition(":")[2] if ":" in host.lstrip("[").split("]")[-1] else "80"
            if scheme not in ("http", "https") or not sep or not host.strip(":[]") or not port.isdigit():
                raise ValueError(f"{v!r} is not an http(s)://host[:port] URL")
        return v

    @field_validator("region")
    @classmethod
    def _region(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not _REGION.match(v):
            raise ValueError(f"{v!r} is not a region name like us-east-1")
        return v

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")


class Toleration(_Model):
    """A core/v1 toleration, checked by the rules the API server applies to a pod's tolerations."""

    key: Optional[str] = None
    operator: Optional[Literal["Exists", "Equal"]] = None
    value: Optional[str] = None
    effect: Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]] = None

    @model_validator(mode="after")
    def _api_server_rules(self) -> "Toleration":
        if self.key:
            check_qualified_name(self.key, "key")
        elif self.operator != "Exists":
            raise ValueError("operator must be Exists when key is empty (it then matches every taint); "
                             "set a key or operator: Exists")
        if self.operator == "Exists" and self.value:
            raise ValueError("value must be empty when operator is Exists")
        if self.value:
            check_label_value(self.value, "value")
        return self


class ClusterSpec(_Model):
    """How the operator places the experiment on Kubernetes (ignored by the local CLI)."""

    image: str = Field("ghcr.io/djinn-bench/djinn-bench:0.1.0", description="Client/runner + analysis image")
    server_image: Optional[str] = Field(None, description="Djinn server image; defaults to image")
    ray_image: Optional[str] = Field(None, description="Ray head image for the RayCluster; defaults to image")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list, description="Secrets (docker-registry) every "
                                                                             "pod pulls its image with")
    gpu: bool = Field(True, description="Request nvidia.com/gpu for the server, Ray head and native jobs")
    gpu_placement: Literal["phased", "separate"] = Field(
        "phased", description="phased: one GPU, released between baseline families; separate: each holds its own")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Pins the GPU holders; experiments "
                                          "with the same nodeSelector share one GPU pool and take it in turn")
    tolerations: list[Toleration] = Field(default_factory=list)
    service_account_name: Optional[str] = Field(None, description="For IRSA: a service account with the role annotation")
    credentials_secret: Optional[str] = Field(None, description="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    backoff_limit: int = Field(1, ge=0, le=10, description="Retries of a client Job before its run is Failed")
    server_memory: str = Field("16Gi", description="Memory request of the server and Ray head pods")
    server_cpu: str = Field("2", description="CPU request of the server and Ray head pods (and native Jobs)")
    client_memory: str = Field("2Gi", description="Memory request of client and analysis Jobs")
    client_cpu: str = Field("1", description="CPU request of client and analysis Jobs")
    active_deadline_seconds: int = Field(7200, ge=60, le=604800, description="Deadline of each client Job")
    server_ready_deadline_seconds: int = Field(
        900, ge=1, le=86400, description="Djinn server not ready this long after the wait began: ServerNotReady")
    ray_ready_deadline_seconds: int = Field(
        900, ge=1, le=86400, description="RayCluster head not ready this long after the wait began: RayClusterNotReady")
    child_conflict_deadline_seconds: int = Field(
        600, ge=1, le=86400, description="A child's name held this long by an object of another owner: ChildConflict")
    djinn_token_secret: Optional[str] = Field(
        None, description="With djinnServer: Secret whose key `token` is that server's bearer token (our own server "
                          "gets a token Secret created by the operator)")
    model_claim: Optional[str] = Field(
        None, description="PersistentVolumeClaim holding the weights, mounted at modelMountPath in the server, the "
                          "Ray head and native Jobs: a model directory (modelId: /models/<dir>) or a Hugging Face "
                          "cache (HF_HUB_CACHE points there, so a hub id resolves offline)")
    model_mount_path: str = Field("/models", pattern=r"^/[^:]*$", description="Where modelClaim is mounted")
    hf_token_secret: Optional[str] = Field(
        None, description="Secret whose key HF_TOKEN lets the pods download modelId from the Hugging Face hub "
                          "(gated models such as Llama 2); into modelClaim when given, else into the pod")
    queue_name: Optional[str] = Field(
        None, description="Kueue LocalQueue: every child gets the kueue.x-k8s.io/queue-name label and Jobs start "
                          "suspended for Kueue to admit; the operator's own GPU turn-taking is then left to Kueue")

    @field_validator("image", "server_image", "ray_image")
    @classmethod
    def _image(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not _IMAGE.match(v):
            raise ValueError(f"{v!r} is not an image reference like ghcr.io/org/name:tag (path lowercase, no spaces)")
        return v

    @field_validator("server_memory", "client_memory")
    @classmethod
    def _memory(cls, v: str) -> str:
        parse_quantity(v)
        return v

    @field_validator("server_cpu", "client_cpu")
    @classmethod
    def _cpu(cls, v: str) -> str:
        if not _CPU.match(v):
            raise ValueError(f"{v!r} is not a CPU quantity like 2, 0.5 or 500m")
        return v

    @field_validator("node_selector")
    @classmethod
    def _selector(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            check_qualified_name(key, "label key")
            check_label_value(value, f"value of {key}:")
        return v

    @field_validator("model_claim", "hf_token_secret", "djinn_token_secret", "credentials_secret",
                     "service_account_name")
    @classmethod
    def _object_name(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and (len(v) > 253 or not _DNS_SUBDOMAIN.match(v)):
            raise ValueError(f"{v!r} is not an object name (lowercase alphanumerics, '-' and '.')")
        return v

    @property
    def pretrained_source(self) -> Optional[str]:
        """Where pods find pretrained weights; None: nowhere, so ``weights: auto`` means synthetic on a cluster."""
        where = [f"PersistentVolumeClaim {self.model_claim} at {self.model_mount_path}"] if self.model_claim else []
        if self.hf_token_secret:
            where.append(f"the Hugging Face hub with the token of Secret {self.hf_token_secret}")
        return " or ".join(where) or None

    @field_validator("image_pull_secrets")
    @classmethod
    def _pull_secrets(cls, v: list[str]) -> list[str]:
        for name in v:
            if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
                raise ValueError(f"{name!r} is not a Secret name (lowercase alphanumerics, '-' and '.')")
        return v

    @field_validator("queue_name")
    @classmethod
    def _queue(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and (len(v) > 63 or not _DNS_LABEL.match(v)):
            raise ValueError(f"{v!r} is not a LocalQueue name (a DNS label: lowercase alphanumerics and '-')")
        return v


class ExperimentSpec(_Model):
    """An agent-scaling experiment (Experiment 2.2) plus the decode modes of Experiment 2.1."""

    model_id: str = Field("sshleifer/tiny-gpt2", min_length=1, description="HF model id or local path")
    weights: Literal["auto", "pretrained", "synthetic"] = Field(
        "auto", description="pretrained: local path or HF cache; synthetic: config from configs/models, seeded random")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="auto: fp16 on GPU, fp32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    prompt: Optional[str] = Field(None, description="Prompt text; configs/prompt.txt when unset")
    prompt_file: Optional[str] = None
    baselines: list[Baseline] = Field(
        default_factory=lambda: list(AGENT_BASELINES), min_length=1)
    agent_counts: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32], min_length=1,
                                    max_length=MAX_AGENT_COUNTS,
                                    json_schema_extra={"items": {"type": "integer", "minimum": 1,
                                                                 "maximum": MAX_AGENTS}})
    iterations: int = Field(1, ge=1, le=1000, description="Reason->Act->Reflect cycles per agent; each cycle grows the "
                                                  "agent's history (a server session holds --max-seq-len tokens)")
    min_steps: Optional[int] = Field(
        None, ge=1, le=1_000_000, description="Steps to measure per N at least (100 for a p99 of real samples): each N runs "
                                "in ceil(minSteps / (2 x N x iterations)) rounds of fresh agents; one round when unset")
    runs: int = Field(30, ge=1, le=10_000, description="Decode runs per mode (Experiment 2.1)")
    warmup_runs: int = Field(5, ge=0, le=1000, description="Runs discarded before measuring")
    new_tokens: int = Field(50, ge=1, le=4096)
    sleep_seconds: float = Field(10.0, ge=0, le=3600, description="Act phase: seconds each agent sleeps")
    stop_on_oom: bool = True
    djinn_sweep_cap: Optional[int] = Field(
        None, ge=1, le=MAX_AGENTS, description="djinn_agents: after agentCounts, keep doubling N up to this cap and stop at the "
                                "first failure, so Djinn's limit is measured; unset: agentCounts only")
    gpu_per_actor: float = Field(0.01, ge=0.0001, le=1, description="Ray keep-alive: logical GPU per actor")
    gpu_per_task: float = Field(1.0, ge=0.0001, le=1, description="Ray serverless: logical GPU per step task "
                                                              "(1: each cold function gets the GPU to itself)")
    emulated_device_memory: Optional[str] = Field(
        None, description="Keep-alive device memory cap (e.g. 1Mi) shared by all actors; for CPU runs")
    seed: int = 0
    djinn_server: Optional[str] = Field(None, description="host:port of a running Djinn data plane; started locally when unset")
    ray_address: Optional[str] = Field(None, description="Existing Ray cluster (ray://host:port, host:port or "
                                                          "auto); a local Ray is started when unset")
    output: OutputSpec = Field(default_factory=lambda: OutputSpec(uri="out"))
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)

    @field_validator("agent_counts")
    @classmethod
    def _counts(cls, v: list[int]) -> list[int]:
        bad = [n for n in v if not 1 <= n <= MAX_AGENTS]
        if bad:
            raise ValueError(f"agent counts must be between 1 and {MAX_AGENTS}, got {bad[0]}")
        return sorted(set(v))

    @field_validator("baselines")
    @classmethod
    def _unique(cls, v: list[Baseline]) -> list[Baseline]:
        return list(dict.fromkeys(v))

    @field_validator("emulated_device_memory")
    @classmethod
    def _quantity(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            parse_quantity(v)
        return v

    @field_validator("djinn_server")
    @classmethod
    def _hostport(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            split_hostport(v)
        return v

    @field_validator("ray_address")
    @classmethod
    def _ray_address(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and v != "auto":
            try:
                split_hostport(v.removeprefix("ray://"))
            except ValueError:
                raise ValueError(f"{v!r} is not ray://host:port, host:port or auto") from None
        return v

    @model_validator(mode="after")
    def _prompt(self) -> "ExperimentSpec":
        if self.prompt is not None and self.prompt_file is not None:
            raise ValueError("give prompt or promptFile, not both")
        return self

    @field_validator("djinn_sweep_cap")
    @classmethod
    def _sweep_cap(cls, v: Optional[int], info: ValidationInfo) -> Optional[int]:
        largest = max(info.data.get("agent_counts") or [1])
        if v is not None and v < largest:
            raise ValueError(f"{v} is below the largest agent count {largest}; raise it or drop it")
        return v

    @property
    def emulated_device_bytes(self) -> Optional[int]:
        return parse_quantity(self.emulated_device_memory) if self.emulated_device_memory else None


def split_hostport(text: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); a one-line error otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port (e.g. localhost:5556)")
    return host.strip("[]"), int(port)


_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_ERROR_CHARS = 300


def _first_error(exc: ValidationError) -> str:
    """``spec.<field path>: <what, and the fix>`` on one line; odd keys quoted, long ones cut."""
    err = exc.errors()[0]
    path = "".join(f".{p}" if isinstance(p, str) and _FIELD.match(p) else f"[{p!r}]" for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field; remove it or check its spelling"
    elif err["type"] == "too_long":
        msg = f"at most {err['ctx']['max_length']} items, got {err['ctx']['actual_length']}; give fewer"
    line = " ".join(f"spec{path}: {msg}".split())
    return line if len(line) <= MAX_ERROR_CHARS else line[:MAX_ERROR_CHARS - 3] + "..."


def parse_spec(data: Any) -> ExperimentSpec:
    """Validate a spec mapping (camelCase or snake_case); raise SpecError with one line."""
    if not isinstance(data, dict):
        raise SpecError("spec: expected a mapping of fields")
    try:
        return ExperimentSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_first_error(exc)) from None


def split_document(doc: Any) -> tuple[str, Any]:
    """A full ``AgentScalingExperiment`` document (or a bare spec) -> (name, its spec, not yet validated)."""
    if not isinstance(doc, dict):
        raise SpecError("document: expected a YAML mapping")
    if "kind" not in doc and "spec" not in doc:
        return "experiment", doc
    if doc.get("kind") != KIND:
        raise SpecError(f"kind: expected {KIND}, got {doc.get('kind')!r}")
    if doc.get("apiVersion") != API_VERSION:
        raise SpecError(f"apiVersion: expected {API_VERSION}, got {doc.get('apiVersion')!r}")
    return (doc.get("metadata") or {}).get("name") or "experiment", doc.get("spec") or {}


def parse_document(doc: Any) -> tuple[str, ExperimentSpec]:
    """A full ``AgentScalingExperiment`` document (or a bare spec) -> (name, spec)."""
    name, raw = split_document(doc)
    return name, parse_spec(raw)


def read_document(path: str | Path) -> tuple[str, Any]:
    """(name, spec not yet validated) of the YAML file holding one experiment document."""
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise SpecError(f"{p}: no such file") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return split_document(doc)


def load_spec_file(path: str | Path) -> tuple[str, ExperimentSpec]:
    """Read and validate a YAML file holding one experiment document."""
    name, raw = read_document(path)
    return name, parse_spec(raw)


def to_document(name: str, spec: ExperimentSpec, namespace: Optional[str] = None) -> dict:
    """The custom resource a user would ``kubectl apply`` for this spec."""
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta,
            "spec": spec.model_dump(mode="json", by_alias=True, exclude_none=True)}
