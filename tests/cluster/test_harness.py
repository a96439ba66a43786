"""The harness's own rules, where they copy a real component's: KubeRay's command, Kubernetes' $(VAR), images."""
import pytest

from images import ROOT, ImagePullError, resolve
from kuberay import head_pod, ray_start_command
from pods import container_argv, expand


def test_ray_start_command_is_kuberays():
    """pod.go: params sorted, booleans as bare flags, num-cpus rounded up from the CPU limit or request,
    memory from the limit in bytes, num-gpus from nvidia.com/gpu, --block always."""
    cmd = ray_start_command({"dashboard-host": "0.0.0.0", "num-gpus": "1"},
                            {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}})
    assert cmd == ("ray start --head  --block  --dashboard-agent-listen-port=52365  --dashboard-host=0.0.0.0 "
                   " --memory=2147483648  --metrics-export-port=8080  --num-cpus=1  --num-gpus=1 ")


def test_head_pod_keeps_a_user_command_in_front_unless_it_starts_ray_itself():
    cluster = {"metadata": {"name": "rc", "namespace": "ns", "uid": "u"}, "spec": {"headGroupSpec": {
        "rayStartParams": {}, "template": {"spec": {"containers": [{"name": "ray-head", "image": "i",
                                                                     "command": ["echo", "hi there"]}]}}}}}
    _, spec = head_pod(cluster)
    ray = spec["containers"][0]
    assert ray["command"] == ["/bin/bash", "-c", "--"]
    assert ray["args"][0].startswith("echo 'hi there' && ulimit -n 65536; ray start --head ")
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["command"] = ["ray", "start", "--head"]
    assert head_pod(cluster)[1]["containers"][0]["command"] == ["ray", "start", "--head"]


def test_var_references_expand_like_kubernetes():
    assert expand("$(A)/x $$(A) $(MISSING)", {"A": "a"}) == "a/x $(A) $(MISSING)"
    image = resolve("djinn-bench:0.1.0", "/pods/p/home")
    assert container_argv(image, {"args": ["--version"]}, {}) == ["djinn-bench", "--version"]  # ENTRYPOINT + args
    assert container_argv(image, {}, {}) == ["djinn-bench", "--help"]  # ENTRYPOINT + CMD


def test_images_map_to_the_local_install_with_their_dockerfiles_env():
    image = resolve("ghcr.io/djinn-bench/djinn-operator:0.1.0", "/pods/p/home")
    assert image.env["DJINN_CONFIG_DIR"] == str(ROOT / "configs") and image.env["PYTHONUNBUFFERED"] == "1"
    assert image.env["PATH"].split(":")[0].endswith("bin") and image.workdir == image.env["HOME"] == "/pods/p/home"
    with pytest.raises(ImagePullError, match="no Dockerfile"):
        resolve("docker.io/minio/minio:RELEASE.2025", "/pods/p/home")
