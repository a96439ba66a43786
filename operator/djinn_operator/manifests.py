"""Pure builders of the experiment's children: Djinn server Deployment + Service, RayCluster, Jobs."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Optional

from djinn.runners import plan as run_plan
from djinn.server.limits import DEFAULT_SHUTDOWN_GRACE_S
from djinn.server.sizing import server_config
from djinn.spec import DECODE_MODES, RAY_BASELINES, Baseline, ExperimentSpec, parse_quantity

from . import names, raycluster

CONTROL_PORT, DATA_PORT = 5555, 5556
TOKEN_ENV, TOKEN_KEY = "DJINN_AUTH_TOKEN", "token"  # the server and every client read the bearer token there
SERVER_GRACE_S = int(DEFAULT_SHUTDOWN_GRACE_S)  # --shutdown-grace: in-flight requests finish or are answered
HOST_ARENA_SHARE = 0.25  # of the server pod's memory request: the bound on parked sessions' caches (--host-kv-gb)
GPU = "nvidia.com/gpu"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
RUN_AS = 10001  # the images' djinn user (numeric, so the kubelet can check runAsNonRoot)
# Pod Security "restricted": non-root, no privilege escalation, no capabilities, the runtime's seccomp profile
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
DJINN_FAMILY = (Baseline.djinn_agents, *DECODE_MODES)


def family(baseline: str) -> str:
    """Which GPU holder a baseline needs: ``native`` (its own Job), ``ray`` or ``djinn``."""
    b = Baseline(baseline)
    return "ray" if b in RAY_BASELINES else "djinn" if b in DJINN_FAMILY else "native"


@dataclass(frozen=True)
class Experiment:
    """One custom resource and its validated spec: everything the builders need."""

    name: str
    namespace: str
    spec: ExperimentSpec

    @property
    def results_uri(self) -> str:
        return f"{self.spec.output.uri.rstrip('/')}/{self.namespace}/{self.name}"

    def _uses(self, fam: str) -> bool:
        return any(family(b.value) == fam for b in self.spec.baselines)

    @cached_property
    def server_name(self) -> Optional[str]:
        """Our Djinn server (Deployment and Service); None when not needed or ``djinnServer`` is given."""
        return names.server(self.name) if self._uses("djinn") and not self.spec.djinn_server else None

    @cached_property
    def ray_name(self) -> Optional[str]:
        """Our RayCluster; None when not needed or ``rayAddress`` is given."""
        return names.ray(self.name) if self._uses("ray") and not self.spec.ray_address else None

    @property
    def token_secret(self) -> Optional[str]:
        """Secret with the Djinn server's bearer token: ours (created with the server) or the given one."""
        if self.server_name:
            return names.auth_secret(self.name)
        return self.spec.cluster.djinn_token_secret if self.spec.djinn_server else None

    @property
    def djinn_address(self) -> str:
        return self.spec.djinn_server or f"{self.server_name}.{self.namespace}.svc:{DATA_PORT}"

    @property
    def ray_address(self) -> str:
        return self.spec.ray_address or raycluster.client_address(self.ray_name, self.namespace)

    def spec_json(self) -> str:
        return spec_json(self.spec)


def spec_json(spec: ExperimentSpec) -> str:
    """The spec as every Job gets it (``--spec-json``) and the status records it (``plannedSpec``)."""
    return json.dumps(spec.model_dump(mode="json", by_alias=True, exclude_none=True), separators=(",", ":"),
                      sort_keys=True)


def _labels(exp: Experiment, component: str, **extra: str) -> dict[str, str]:
    """Labels of a child and its pods; Kueue's queue label when the experiment names a LocalQueue."""
    queue = exp.spec.cluster.queue_name
    return names.labels(exp.name, component, **extra, **({KUEUE_QUEUE_LABEL: queue} if queue else {}))


def _meta(exp: Experiment, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "namespace": exp.namespace, "labels": labels}


def _resources(exp: Experiment, holder: bool) -> dict[str, Any]:
    """Requests on every container (server sizes for GPU holders, client sizes otherwise); the GPU as a limit."""
    c = exp.spec.cluster
    cpu, memory = (c.server_cpu, c.server_memory) if holder else (c.client_cpu, c.client_memory)
    res: dict[str, Any] = {"requests": {"cpu": cpu, "memory": memory}}
    if holder and c.gpu:
        res["limits"] = {GPU: 1}
    return res


MODEL_VOLUME = "models"


def _model_env(exp: Experiment) -> list[dict[str, Any]]:
    """How a pod reaches pretrained weights: the claim as the HF cache, the hub token from its Secret."""
    c = exp.spec.cluster
    env: list[dict[str, Any]] = [{"name": "HF_HUB_CACHE", "value": c.model_mount_path}] if c.model_claim else []
    if c.hf_token_secret:
        env += [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": c.hf_token_secret, "key": "HF_TOKEN"}}},
                {"name": "DJINN_DOWNLOAD_WEIGHTS", "value": "1"}]
    return env


def _container(exp: Experiment, name: str, image: str, holder: bool, model: bool = True,
               **fields: Any) -> dict[str, Any]:
    """A container that reports its failure's last log lines in its termination message (the operator
    quotes them); ``model``: it loads weights or their tokenizer (the claim mounted, the hub token)."""
    c = exp.spec.cluster
    out = {"name": name, "image": image, "imagePullPolicy": c.image_pull_policy, **fields,
           "resources": _resources(exp, holder), "securityContext": dict(CONTAINER_SECURITY),
           "terminationMessagePolicy": "FallbackToLogsOnError"}
    if model and (env := _model_env(exp)):
        out["env"] = [*out.get("env", []), *env]
    if model and c.model_claim:  # writable only when the hub download lands in it
        out["volumeMounts"] = [{"name": MODEL_VOLUME, "mountPath": c.model_mount_path,
                                "readOnly": not c.hf_token_secret}]
    return out


def _pod(exp: Experiment, containers: list[dict], gpu: bool, **extra: Any) -> dict[str, Any]:
    """Pod spec (Pod Security restricted); the node selector only pins GPU holders, tolerations apply to every pod."""
    c = exp.spec.cluster
    pod: dict[str, Any] = {"containers": containers, "securityContext": dict(POD_SECURITY), **extra}
    if any(m["name"] == MODEL_VOLUME for ct in containers for m in ct.get("volumeMounts", [])):
        pod["volumes"] = [{"name": MODEL_VOLUME, "persistentVolumeClaim": {
            "claimName": c.model_claim, "readOnly": not c.hf_token_secret}}]
    if c.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in c.image_pull_secrets]
    if gpu and c.node_selector:
        pod["nodeSelector"] = dict(c.node_selector)
    if c.tolerations:
        pod["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in c.tolerations]
    return pod


def server_labels(exp: Experiment) -> dict[str, str]:
    return _labels(exp, "server")


def _token_env(exp: Experiment) -> list[dict[str, Any]]:
    secret = exp.token_secret
    return [{"name": TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": secret, "key": TOKEN_KEY}}}] if secret else []


def auth_secret(exp: Experiment, token: str) -> dict[str, Any]:
    """The bearer token the server requires off loopback; owned by the experiment like every child."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _meta(exp, exp.token_secret, _labels(exp, "server")), "stringData": {TOKEN_KEY: token}}


def server_command(spec: ExperimentSpec) -> list[str]:
    """The experiment's server config, placed in the pod: every interface (a token guards it), the GPU the
    pod was given, the grace its termination period allows, and host memory for parked caches sized from
    the pod's memory request (the node's free memory is not the pod's; past it the server refuses)."""
    gpu = spec.cluster.gpu
    arena_gb = HOST_ARENA_SHARE * parse_quantity(spec.cluster.server_memory) / 2**30
    config = server_config(spec, device="cuda:0" if gpu else "cpu", host="0.0.0.0", port=DATA_PORT,
                           control_port=CONTROL_PORT, max_vram_gb=80.0, shutdown_grace_s=float(SERVER_GRACE_S),
                           host_kv_gb=arena_gb)
    return ["python", "-m", "djinn.server.server_main", *config.to_argv()]


def server_deployment(exp: Experiment) -> dict[str, Any]:
    """One replica, Recreate (never two pods on one GPU); progressDeadlineSeconds bounds provisioning."""
    c, labels = exp.spec.cluster, server_labels(exp)
    container = _container(
        exp, "djinn-server", c.server_image or c.image, holder=True, command=server_command(exp.spec),
        env=_token_env(exp),
        ports=[{"name": "control", "containerPort": CONTROL_PORT}, {"name": "data", "containerPort": DATA_PORT}],
        readinessProbe={"httpGet": {"path": "/healthz", "port": CONTROL_PORT}, "periodSeconds": 5})
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(exp, exp.server_name, labels),
            "spec": {"replicas": 1, "strategy": {"type": "Recreate"},
                     "progressDeadlineSeconds": c.server_ready_deadline_seconds,
                     "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": _pod(exp, [container], gpu=True,  # the grace, then the kubelet's margin
                                               terminationGracePeriodSeconds=SERVER_GRACE_S + 10)}}}


def server_service(exp: Experiment) -> dict[str, Any]:
    labels = server_labels(exp)
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(exp, exp.server_name, labels),
            "spec": {"selector": labels, "ports": [
                {"name": "control", "port": CONTROL_PORT, "targetPort": CONTROL_PORT},
                {"name": "data", "port": DATA_PORT, "targetPort": DATA_PORT}]}}


def ray_cluster(exp: Experiment) -> dict[str, Any]:
    c, labels = exp.spec.cluster, _labels(exp, "ray")
    params = {"dashboard-host": "0.0.0.0", **({"num-gpus": "1"} if c.gpu else {})}
    head = _container(exp, "ray-head", c.ray_image or c.image, holder=True,
                      ports=[{"name": "gcs", "containerPort": 6379}, {"name": "dashboard", "containerPort": 8265},
                             {"name": "client", "containerPort": raycluster.CLIENT_PORT}])
    return raycluster.RayCluster(
        metadata=_meta(exp, exp.ray_name, labels),
        spec=raycluster.RayClusterSpec(head_group_spec=raycluster.HeadGroupSpec(
            ray_start_params=params,
            template={"metadata": {"labels": labels}, "spec": _pod(exp, [head], gpu=True)})),
    ).to_dict()


def _job(exp: Experiment, name: str, labels: dict[str, str], command: list[str], gpu: bool,
         model: bool = True, token: bool = False) -> dict[str, Any]:
    c, out = exp.spec.cluster, exp.spec.output
    env = ([{"name": "AWS_ENDPOINT_URL_S3", "value": out.endpoint_url}] if out.endpoint_url else []) + \
          ([{"name": "AWS_REGION", "value": out.region}] if out.region else []) + (_token_env(exp) if token else [])
    # a Job that holds the GPU (native_pytorch) needs the CUDA image the server runs
    image = (c.server_image or c.image) if gpu and c.gpu else c.image
    container = _container(exp, "djinn-bench", image, holder=gpu, model=model, command=command,
                           **({"env": env} if env else {}))
    if c.credentials_secret:
        container["envFrom"] = [{"secretRef": {"name": c.credentials_secret}}]
    extra: dict[str, Any] = {"restartPolicy": "Never"}
    if c.service_account_name:
        extra["serviceAccountName"] = c.service_account_name
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(exp, name, labels),
            "spec": {"backoffLimit": c.backoff_limit, "activeDeadlineSeconds": c.active_deadline_seconds,
                     **({"suspend": True} if c.queue_name else {}),  # Kueue admits it
                     "template": {"metadata": {"labels": labels}, "spec": _pod(exp, [container], gpu, **extra)}}}


def _endpoint(exp: Experiment) -> list[str]:
    url = exp.spec.output.endpoint_url
    return ["--endpoint-url", url] if url else []


def run_command(exp: Experiment, baseline: str, n: Optional[int]) -> list[str]:
    """The same CLI as the local path, for one (baseline, N) or one decode mode."""
    fam = family(baseline)
    if baseline == "native_pytorch" and n is None:  # the Experiment 2.1 reference: HF generate on the GPU
        return ["djinn-bench", "decode", "--backend", "native", "--spec-json", exp.spec_json(),
                "--output-dir", exp.results_uri, *_endpoint(exp)]
    # one N of a Djinn sweep: --djinn-sweep-cap N runs that N alone and, as the sweep's stop, a failure the
    # result document records exits 0 (a Job that exited 1 would be retried, then fail the experiment)
    swept = n is not None and run_plan.stops_at_first_failure(exp.spec, Baseline(baseline))
    return ["djinn-bench", "run", "--spec-json", exp.spec_json(), "--baselines", baseline,
            *(["--agent-counts", str(n)] if n is not None else []),
            *(["--djinn-sweep-cap", str(n)] if swept else []), "--output-dir", exp.results_uri,
            *_endpoint(exp), *(["--djinn-server", exp.djinn_address] if fam == "djinn" else []),
            *(["--ray-address", exp.ray_address] if fam == "ray" else []), "--no-analyze"]


def run_job(exp: Experiment, baseline: str, n: Optional[int]) -> dict[str, Any]:
    """Client Job of one run; native_pytorch holds the GPU itself."""
    extra = {"djinn.io/baseline": baseline, **({"djinn.io/agents": str(n)} if n is not None else {})}
    return _job(exp, names.run_job(exp.name, baseline, n), _labels(exp, "run", **extra),
                run_command(exp, baseline, n), gpu=family(baseline) == "native", token=family(baseline) == "djinn")


def analysis_job(exp: Experiment) -> dict[str, Any]:
    """Figure 6, Table 2 and claims.json from every result document of the experiment."""
    uri = exp.results_uri
    return _job(exp, names.analysis_job(exp.name), _labels(exp, "analysis"),
                ["djinn-bench", "analyze", "--input", uri, "--output", uri, *_endpoint(exp)], gpu=False, model=False)
