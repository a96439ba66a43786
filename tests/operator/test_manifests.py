"""Child manifests: names, server, RayCluster, Jobs (pure, no server)."""
import json
import subprocess
import sys

import kubernetes_validate
import pytest

from djinn.runners.local_server import free_port
from djinn.spec import Baseline, ExperimentSpec, parse_spec
from djinn_operator import manifests, names, raycluster

from pod_security import pod_spec, violations

K8S = "1.30"


def exp(**kw) -> manifests.Experiment:
    spec = {"baselines": [b.value for b in Baseline], "agentCounts": [1, 2],
            "output": {"uri": "s3://bkt/pre", "endpointUrl": "http://minio:9000", "region": "eu-west-1"}, **kw}
    return manifests.Experiment("exp1", "lab", parse_spec(spec))


def container(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("parts,limit", [(("exp1", "djinn-server"), 63), (("a" * 80, "ray"), 47),
                                         (("My.Exp", "analysis"), 63), (("9lives", "x"), 63)])
def test_names_are_dns_1035_and_bounded(parts, limit):
    name = names.dns_name(*parts, limit=limit)
    assert len(name) <= limit and name[0].isalpha() and name[-1].isalnum()
    assert set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
    assert names.dns_name(*parts, limit=limit) == name  # deterministic


def test_names_keep_short_names_and_hash_long_ones_apart():
    assert names.run_job("exp1", "ray_keepalive", 4) == "exp1-ray-keepalive-n4"
    assert names.run_job("exp1", "full_djinn", None) == "exp1-full-djinn"
    long_a, long_b = "x" * 70 + "a", "x" * 70 + "b"
    assert names.server(long_a) != names.server(long_b)
    assert len(names.ray(long_a)) <= names.RAY_NAME_MAX
    assert len(names.labels(long_a, "run")[names.EXPERIMENT_LABEL]) <= 63


def test_server_deployment_runs_the_server_on_the_gpu():
    e = exp(cluster={"serverImage": "srv:1", "nodeSelector": {"gpu": "a100"},
                     "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
            modelId="meta-llama/Llama-2-7b-hf", weights="pretrained", dtype="float16")
    dep = manifests.server_deployment(e)
    c = container(dep)
    assert c["command"][:3] == ["python", "-m", "djinn.server.server_main"]
    argv = c["command"][3:]
    values = dict(a.split("=", 1) for a in argv if "=" in a)  # string values travel as --flag=value
    flag = lambda name: values[name] if name in values else argv[argv.index(name) + 1]  # noqa: E731
    assert [flag(f) for f in ("--device", "--gpu", "--host", "--port", "--control-port", "--max-concurrent",
                              "--shutdown-grace", "--host-kv-gb", "--model-id", "--weights", "--dtype")] == \
        ["cuda", "0", "0.0.0.0", "5556", "5555", "64", "30", "4", "meta-llama/Llama-2-7b-hf", "pretrained", "float16"]
    assert c["image"] == "srv:1" and c["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": 5555}
    pod = dep["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "a100"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    assert dep["spec"]["selector"]["matchLabels"] == dep["spec"]["template"]["metadata"]["labels"]
    svc = manifests.server_service(e)
    assert {p["port"] for p in svc["spec"]["ports"]} == {5555, 5556}
    assert svc["metadata"]["name"] == dep["metadata"]["name"] == "exp1-djinn-server"
    for obj in (dep, svc):
        kubernetes_validate.validate(obj, K8S, strict=True)


def test_cpu_server_has_no_gpu():
    c = container(manifests.server_deployment(exp(cluster={"gpu": False})))
    assert c["command"][3:5] == ["--device", "cpu"] and "--gpu" not in c["command"]
    assert "limits" not in c["resources"] and c["image"] == ExperimentSpec().cluster.image


def test_ray_cluster_head_holds_the_gpu():
    rc = manifests.ray_cluster(exp(cluster={"rayImage": "rayproject/ray:2.40.0-gpu"}))
    assert (rc["apiVersion"], rc["kind"], rc["metadata"]["name"]) == ("ray.io/v1", "RayCluster", "exp1-ray")
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"] == {"dashboard-host": "0.0.0.0", "num-gpus": "1"}
    assert head["template"]["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert head["template"]["spec"]["containers"][0]["image"] == "rayproject/ray:2.40.0-gpu"
    assert rc["spec"]["suspend"] is False and "workerGroupSpecs" not in rc["spec"]
    cpu = manifests.ray_cluster(exp(cluster={"gpu": False}))["spec"]["headGroupSpec"]
    assert "num-gpus" not in cpu["rayStartParams"]
    assert raycluster.client_address("exp1-ray", "lab") == "ray://exp1-ray-head-svc.lab.svc:10001"


def test_a_swept_djinn_job_records_its_failure_and_exits_0(tmp_path):
    """One N of a Djinn sweep, the Job's own command run as its pod runs it: the agents cannot reach the
    server, the document records that, and the process exits 0 (1 would make the Job retry, then fail
    the experiment) so the operator skips the larger N. Without a sweep the same failure exits 1."""
    def job_command(e, n):
        cmd = container(manifests.run_job(e, "djinn_agents", n))["command"]
        cmd[cmd.index("--output-dir") + 1] = str(tmp_path / e.name)
        cmd[cmd.index("--djinn-server") + 1] = f"127.0.0.1:{free_port()}"  # nobody listens
        i = cmd.index("--endpoint-url")
        del cmd[i:i + 2]
        return [sys.executable, "-m", "djinn.cli", *cmd[1:]]

    base = {"modelId": "sshleifer/tiny-gpt2", "weights": "synthetic", "device": "cpu", "sleepSeconds": 0,
            "newTokens": 2, "output": {"uri": "s3://b/p", "endpointUrl": "http://x:9"}}
    swept = manifests.Experiment("swept", "lab", parse_spec({**base, "baselines": ["djinn_agents"],
                                                             "agentCounts": [1], "djinnSweepCap": 4}))
    cmd = job_command(swept, 4)
    assert cmd[cmd.index("--djinn-sweep-cap") + 1] == "4"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    doc = json.loads(next((tmp_path / "swept" / "results" / "djinn_agents").glob("*_n4.json")).read_text())
    assert doc["n_agents"] == 4 and doc["error"] and not doc["oom"]
    plain = manifests.Experiment("plain", "lab", parse_spec({**base, "baselines": ["djinn_agents"], "agentCounts": [4]}))
    cmd = job_command(plain, 4)
    assert "--djinn-sweep-cap" not in cmd
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=120).returncode == 1


def test_run_jobs_call_the_cli_with_the_right_endpoints():
    e = exp(cluster={"credentialsSecret": "s3-creds", "serviceAccountName": "irsa", "backoffLimit": 2,
                     "activeDeadlineSeconds": 600})
    uri = "s3://bkt/pre/lab/exp1"
    ray = manifests.run_job(e, "ray_keepalive", 2)
    cmd = container(ray)["command"]
    assert cmd[:3] == ["djinn-bench", "run", "--spec-json"]
    assert parse_spec(json.loads(cmd[3])) == e.spec  # the planned spec, camelCase
    assert cmd[4:] == ["--baselines", "ray_keepalive", "--agent-counts", "2", "--output-dir", uri,
                       "--endpoint-url", "http://minio:9000",
                       "--ray-address", "ray://exp1-ray-head-svc.lab.svc:10001", "--no-analyze"]
    djinn = container(manifests.run_job(e, "djinn_agents", 1))["command"]
    assert djinn[djinn.index("--djinn-server") + 1] == "exp1-djinn-server.lab.svc:5556"
    decode = container(manifests.run_job(e, "full_djinn", None))["command"]
    assert "--agent-counts" not in decode and "--djinn-server" in decode
    spec = ray["spec"]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"]) == (2, 600)
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "irsa"
    c = pod["containers"][0]
    assert {"name": "AWS_ENDPOINT_URL_S3", "value": "http://minio:9000"} in c["env"]
    assert {"name": "AWS_REGION", "value": "eu-west-1"} in c["env"]
    assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert "limits" not in c["resources"] and "nodeSelector" not in pod
    assert ray["metadata"]["labels"][names.EXPERIMENT_LABEL] == "exp1"
    native = container(manifests.run_job(e, "native_pytorch", 1))
    assert native["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert "--djinn-server" not in native["command"] and "--ray-address" not in native["command"]
    analysis = manifests.analysis_job(e)
    assert container(analysis)["command"] == ["djinn-bench", "analyze", "--input", uri, "--output", uri,
                                              "--endpoint-url", "http://minio:9000"]
    for obj in (ray, analysis):
        kubernetes_validate.validate(obj, K8S, strict=True)


def test_external_server_and_ray_are_used_not_created():
    e = exp(djinnServer="10.0.0.5:5556", rayAddress="ray://head:10001")
    assert e.server_name is None and e.ray_name is None
    assert "10.0.0.5:5556" in container(manifests.run_job(e, "djinn_agents", 1))["command"]
    assert "ray://head:10001" in container(manifests.run_job(e, "ray_serverless", 1))["command"]
    assert exp(baselines=["native_pytorch"]).server_name is None


def test_native_jobs_take_the_cuda_server_image_and_clients_the_plain_one():
    e = exp(cluster={"image": "client:1", "serverImage": "cuda:1"})
    assert container(manifests.run_job(e, "native_pytorch", 2))["image"] == "cuda:1"
    assert container(manifests.run_job(e, "djinn_agents", 2))["image"] == "client:1"
    assert container(manifests.analysis_job(e))["image"] == "client:1"
    cpu = exp(cluster={"image": "client:1", "serverImage": "cuda:1", "gpu": False})
    assert container(manifests.run_job(cpu, "native_pytorch", 2))["image"] == "client:1"


def test_native_decode_reference_job_runs_the_decode_subcommand():
    e = exp()
    cmd = container(manifests.run_job(e, "native_pytorch", None))["command"]
    assert cmd[:4] == ["djinn-bench", "decode", "--backend", "native"]
    assert cmd[cmd.index("--output-dir") + 1] == e.results_uri and "--spec-json" in cmd


@pytest.mark.parametrize("cluster", [{}, {"gpu": False, "serverCpu": "500m", "clientMemory": "1Gi"}])
def test_every_pod_meets_pod_security_restricted_and_requests_cpu_and_memory(cluster):
    e = exp(cluster=cluster)
    children = [manifests.server_deployment(e), manifests.ray_cluster(e), manifests.analysis_job(e),
                *(manifests.run_job(e, b.value, 1) for b in Baseline)]
    for obj in children:
        assert violations(pod_spec(obj)) == [], obj["metadata"]["name"]
    server, client = container(children[0])["resources"]["requests"], container(children[2])["resources"]["requests"]
    assert server == {"cpu": e.spec.cluster.server_cpu, "memory": e.spec.cluster.server_memory}
    assert client == {"cpu": e.spec.cluster.client_cpu, "memory": e.spec.cluster.client_memory}
    head = pod_spec(children[1])["containers"][0]["resources"]["requests"]
    assert head["cpu"] == e.spec.cluster.server_cpu  # KubeRay derives the head's num-cpus from it
    assert violations({"containers": [{"name": "bare", "image": "x"}]}) != []  # the checker does refuse


def test_kueue_queue_name_labels_every_child_and_suspends_jobs():
    e = exp(cluster={"queueName": "team-a"})
    for obj in (manifests.server_deployment(e), manifests.ray_cluster(e), manifests.run_job(e, "ray_keepalive", 2),
                manifests.analysis_job(e)):
        template = obj["spec"]["headGroupSpec"]["template"] if obj["kind"] == "RayCluster" else obj["spec"]["template"]
        for labels in (obj["metadata"]["labels"], template["metadata"]["labels"]):
            assert labels[manifests.KUEUE_QUEUE_LABEL] == "team-a"
        if obj["kind"] == "Job":
            assert obj["spec"]["suspend"] is True
    assert "suspend" not in manifests.run_job(exp(), "ray_keepalive", 2)["spec"]


def test_image_pull_secrets_reach_every_pod():
    e = exp(cluster={"imagePullSecrets": ["ecr-pull", "ghcr.io-token"]})
    for obj in (manifests.server_deployment(e), manifests.ray_cluster(e), manifests.run_job(e, "djinn_agents", 1),
                manifests.run_job(e, "native_pytorch", 1), manifests.analysis_job(e)):
        assert pod_spec(obj)["imagePullSecrets"] == [{"name": "ecr-pull"}, {"name": "ghcr.io-token"}]
        if obj["kind"] != "RayCluster":  # a CRD kubernetes-validate does not know
            kubernetes_validate.validate(obj, K8S, strict=True)
    assert "imagePullSecrets" not in pod_spec(manifests.analysis_job(exp()))


def test_pretrained_weights_reach_every_pod_that_loads_them_and_no_other():
    e = exp(cluster={"modelClaim": "llama-weights", "hfTokenSecret": "hf-token"}, modelId="meta-llama/Llama-2-7b-hf")
    for obj in (manifests.server_deployment(e), manifests.ray_cluster(e), manifests.run_job(e, "native_pytorch", 1),
                manifests.run_job(e, "djinn_agents", 1)):  # clients load the tokenizer from the same place
        pod = pod_spec(obj)
        c = pod["containers"][0]
        env = {v["name"]: v for v in c["env"]}
        assert env["HF_HUB_CACHE"]["value"] == "/models" and env["DJINN_DOWNLOAD_WEIGHTS"]["value"] == "1"
        assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}
        assert c["volumeMounts"] == [{"name": "models", "mountPath": "/models", "readOnly": False}]
        assert pod["volumes"] == [{"name": "models", "persistentVolumeClaim": {"claimName": "llama-weights",
                                                                             "readOnly": False}}]
        assert violations(pod) == [] and c["terminationMessagePolicy"] == "FallbackToLogsOnError"
        if obj["kind"] != "RayCluster":
            kubernetes_validate.validate(obj, K8S, strict=True)
    analysis = pod_spec(manifests.analysis_job(e))
    assert "volumes" not in analysis and not [v for v in analysis["containers"][0].get("env", [])
                                              if v["name"].startswith("HF_")]
    read_only = pod_spec(manifests.server_deployment(exp(cluster={"modelClaim": "llama-weights"})))
    assert read_only["volumes"][0]["persistentVolumeClaim"]["readOnly"] is True


def test_the_server_and_its_clients_share_a_bearer_token_from_a_secret():
    e = exp()
    secret = manifests.auth_secret(e, "s3cret")
    assert secret["metadata"]["name"] == "exp1-djinn-auth" and secret["stringData"] == {"token": "s3cret"}
    ref = {"name": "DJINN_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "exp1-djinn-auth", "key": "token"}}}
    server = manifests.server_deployment(e)
    assert ref in container(server)["env"]
    assert server["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == manifests.SERVER_GRACE_S + 10
    for baseline in ("djinn_agents", "full_djinn", "semantic_blind"):
        assert ref in container(manifests.run_job(e, baseline, 1))["env"]
    for baseline in ("native_pytorch", "ray_keepalive"):  # no token where no Djinn server is called
        assert not [v for v in container(manifests.run_job(e, baseline, 1)).get("env", []) if v["name"] == ref["name"]]
    external = exp(djinnServer="djinn.lab.svc:5556", cluster={"djinnTokenSecret": "their-token"})
    assert external.token_secret == "their-token" and external.server_name is None
    assert container(manifests.run_job(external, "djinn_agents", 1))["env"][-1]["valueFrom"]["secretKeyRef"]["name"] \
        == "their-token"
    kubernetes_validate.validate(secret, K8S, strict=True)
