"""The real operator (``python -m djinn_operator``) against kmock + moto: sequencing, OOM, restart, failures."""
import asyncio

from djinn.spec import KIND
from djinn_operator import k8s
from djinn_operator.__main__ import kopf_args

from kmock_cluster import BUCKET, NS, PREFIX, experiment_spec
from pod_security import pod_spec, violations


def test_experiment_runs_to_success(e2e, s3_endpoint):
    async def scenario(h):
        kubelet = h.start_kubelet({"exp1-ray-keepalive-n2": "oom"})
        cr = await h.create_experiment("exp1", experiment_spec(
            s3_endpoint, baselines=["native_pytorch", "ray_keepalive", "djinn_agents", "full_djinn"],
            agentCounts=[1, 2, 4]))
        status = await h.wait_phase("exp1", "Succeeded", "Failed", timeout=40)
        assert status["phase"] == "Succeeded", status
        assert h.created("jobs") == [
            "exp1-native-pytorch", "exp1-native-pytorch-n1", "exp1-native-pytorch-n2", "exp1-native-pytorch-n4",
            "exp1-ray-keepalive-n1", "exp1-ray-keepalive-n2",
            "exp1-djinn-agents-n1", "exp1-djinn-agents-n2", "exp1-djinn-agents-n4", "exp1-full-djinn",
            "exp1-analysis"]
        assert kubelet.most_active == 1  # one Job at a time
        runs = {r["job"]: r for r in status["runs"]}
        assert runs["exp1-ray-keepalive-n2"]["state"] == "OOM"
        assert runs["exp1-ray-keepalive-n4"]["state"] == "Skipped"
        assert status["progress"] == "11/11" and status["analysis"]["state"] == "Succeeded"
        conds = {c["type"]: c for c in status["conditions"]}
        assert [conds[t]["status"] for t in ("Ready", "Complete", "Progressing", "Failed")] == \
            ["True", "True", "False", "False"]

        # kubectl describe: a Normal Event for each phase change and each run's start and end
        events = await h.wait_events("exp1", lambda ev: ev[-1][1] == "Succeeded")
        assert {t for t, _, _ in events} == {"Normal"}
        reasons = [r for _, r, _ in events]
        assert reasons.count("RunStarted") == 10 and reasons.count("RunSucceeded") == 9  # 11 runs, 1 skipped, 1 OOM
        assert reasons.count("RunOOM") == 1 and reasons.count("RunSkipped") == 1
        assert reasons[-2:] == ["Analyzing", "Succeeded"]
        assert ("Normal", "RunOOM", "ray_keepalive n=2 ran out of device memory (job exp1-ray-keepalive-n2)") in events
        assert status["resultsUri"] == f"s3://{BUCKET}/{PREFIX}/{NS}/exp1"
        for run in runs.values():  # every recorded result is a real S3 object
            if run["state"] in ("Succeeded", "OOM"):
                h.s3.head_object(Bucket=BUCKET, Key=f"{PREFIX}/{NS}/exp1/{run['resultKey']}")

        # phases as written, and GPU holders never overlapping
        writes = h.writes()
        phases = [w[5]["status"]["phase"] for w in writes
                  if w[0] == "operator" and w[2] == "agentscalingexperiments" and w[4] == "status"]
        assert [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p] == [
            "Running", "Provisioning", "Running", "Provisioning", "Running", "Analyzing", "Succeeded"]
        at = [w[:4] for w in writes].index
        assert at(("operator", "POST", "rayclusters", "exp1-ray")) > \
            at(("kubelet", "PATCH", "jobs", "exp1-native-pytorch-n4"))  # after the last native Job finished
        suspend = next(i for i, w in enumerate(writes) if w[:3] == ("operator", "PATCH", "rayclusters")
                       and w[5].get("spec", {}).get("suspend") is True)
        assert at(("kubelet", "PATCH", "jobs", "exp1-ray-keepalive-n2")) < suspend \
            < at(("operator", "POST", "deployments", "exp1-djinn-server"))
        assert at(("kubelet", "PATCH", "jobs", "exp1-full-djinn")) \
            < at(("operator", "DELETE", "deployments", "exp1-djinn-server")) \
            < at(("operator", "POST", "jobs", "exp1-analysis"))

        # every child is owned by the CR, so deleting the CR lets the garbage collector take them
        children = [(kind, n) for kind, plural in (("Job", "jobs"), ("Service", "services"),
                                                   ("RayCluster", "rayclusters")) for n in h.created(plural)]
        assert ("Service", "exp1-djinn-server") in children and ("RayCluster", "exp1-ray") in children
        deployment = next(w[5] for w in writes if w[:3] == ("operator", "POST", "deployments"))  # deleted by now
        for obj in [await h.get(k, n) for k, n in children if k != "Service"] + [deployment]:
            assert violations(pod_spec(obj)) == [], obj["metadata"]["name"]  # Pod Security restricted
        for ref in [(await h.get(kind, name))["metadata"]["ownerReferences"] for kind, name in children] \
                + [deployment["metadata"]["ownerReferences"]]:
            assert ref == [{"apiVersion": cr["apiVersion"], "kind": KIND, "name": "exp1",
                            "uid": cr["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
        assert not (await h.get(KIND, "exp1"))["metadata"].get("finalizers")  # deletion is never blocked
        await h.delete(KIND, "exp1")
        assert await h.get(KIND, "exp1") is None
        before = len(h.writes())
        await h.patch("Job", "exp1-analysis", {"status": {"conditions": []}}, status=True)  # a late child event
        await asyncio.sleep(0.5)
        assert [w for w in h.writes()[before:] if w[:2] == ("operator", "POST")] == []

    e2e(scenario)


def test_operator_restart_resumes_without_duplicates(e2e, s3_endpoint):
    async def scenario(h):
        kubelet = h.start_kubelet({"exp2-native-pytorch-n2": "hold"})
        await h.create_experiment("exp2", experiment_spec(s3_endpoint, baselines=["native_pytorch"],
                                                          agentCounts=[1, 2, 3]))
        await h.wait("job n2", lambda: h.get("Job", "exp2-native-pytorch-n2"))
        await h.stop_operator(kill=True)  # a crash mid-experiment
        kubelet.outcomes.clear()  # n2 finishes while the operator is down
        await h.wait("n2 complete", lambda: _complete(h, "exp2-native-pytorch-n2"))
        assert (await h.status("exp2"))["current"] == {"baseline": "native_pytorch", "n": 2}
        await h.start_operator()
        status = await h.wait_phase("exp2", "Succeeded", "Failed")
        assert status["phase"] == "Succeeded" and status["progress"] == "3/3"
        created = h.created("jobs")
        assert created == ["exp2-native-pytorch-n1", "exp2-native-pytorch-n2", "exp2-native-pytorch-n3",
                           "exp2-analysis"]  # each POSTed once: nothing re-created after the restart
        assert len(await h.list("Job")) == 4

    e2e(scenario)


async def _complete(h, name):
    job = await h.get("Job", name)
    return job and job.get("status", {}).get("conditions")


def test_invalid_failed_and_updated_experiments(e2e, s3_endpoint):
    async def scenario(h):
        kubelet = h.start_kubelet({"fails-native-pytorch-n1": "fail", "noresult-native-pytorch-n1": "missing",
                                   "edited-native-pytorch-n1": "hold"})
        native = dict(baselines=["native_pytorch"], agentCounts=[1, 2],  # CPU: no GPU turn-taking between them
                      cluster={"image": "djinn-bench:test", "gpu": False})
        bad = {"negative": experiment_spec(s3_endpoint, agentCounts=[4, -2]),
               "unknown": experiment_spec(s3_endpoint, baselines=["warp_drive"]),
               "nooutput": {"baselines": ["native_pytorch"]}}
        for name, spec in bad.items():
            await h.create_experiment(name, spec)
        for name in ("fails", "noresult", "edited"):
            await h.create_experiment(name, experiment_spec(s3_endpoint, **native))

        messages = {}
        for name in bad:
            status = await h.wait_phase(name, "Failed")
            failed = next(c for c in status["conditions"] if c["type"] == "Failed")
            assert failed["reason"] == "InvalidSpec" and "\n" not in failed["message"]
            conds = {c["type"]: c for c in status["conditions"]}  # terminal path: all three consistent
            assert conds["Progressing"]["status"] == "False" and conds["Valid"]["status"] == "False"
            assert status["observedGeneration"] == 1 and {c["observedGeneration"] for c in conds.values()} == {1}
            assert conds["Ready"]["status"] == "False" and conds["Ready"]["reason"] == "InvalidSpec"
            assert await h.wait_events(name, bool) == [("Warning", "InvalidSpec", failed["message"])]
            messages[name] = failed["message"]
        assert messages["negative"] == "spec.agentCounts: agent counts must be between 1 and 4096, got -2"
        assert messages["unknown"].startswith("spec.baselines[0]: Input should be 'native_pytorch'")
        assert messages["nooutput"].startswith("spec.output.uri: the operator needs s3://bucket/prefix")

        status = await h.wait_phase("fails", "Failed")
        assert status["runs"][0]["state"] == "Failed" and status["runs"][0]["reason"] == "BackoffLimitExceeded"
        assert status["runs"][1]["state"] == "Pending"
        status = await h.wait_phase("noresult", "Failed")
        assert status["runs"][0]["reason"] == "ResultMissing"

        await h.wait("edited running", lambda: h.get("Job", "edited-native-pytorch-n1"))
        await h.patch(KIND, "edited", {"spec": {"agentCounts": [1, 2, 4]}})  # the API server bumps generation

        async def refused():
            conds = (await h.status("edited")).get("conditions", [])
            return next((c for c in conds if c["type"] == "SpecUpdateRefused" and c["status"] == "True"), None)
        cond = await h.wait("SpecUpdateRefused", refused)
        assert "keeps its planned spec" in cond["message"] and cond["observedGeneration"] == 2
        assert (await h.status("edited"))["observedGeneration"] == 2
        kubelet.outcomes.pop("edited-native-pytorch-n1")
        status = await h.wait_phase("edited", "Succeeded", "Failed")
        assert status["phase"] == "Succeeded" and status["progress"] == "2/2"  # the planned N, not the edit

        created = h.created("jobs")
        assert not [j for j in created if j.startswith(tuple(bad))]
        assert "fails-native-pytorch-n2" not in created and "fails-analysis" not in created

    e2e(scenario)


def test_every_api_call_of_the_operator_is_declared():
    """The guard in k8s._call refuses anything outside API_CALLS (the RBAC test reads that list)."""
    verbs = {(g, r, v) for g, r, v in k8s.API_CALLS}
    assert ("batch", "jobs", "create") in verbs and ("djinn.io", "agentscalingexperiments/status", "patch") in verbs
    assert ("apiextensions.k8s.io", "customresourcedefinitions", "watch") in verbs
    assert ("", "events", "create") in verbs and ("", "namespaces", "list") in verbs
    assert ("batch", "jobs", "delete") not in verbs and ("", "secrets", "list") not in verbs  # get: its own only
    try:
        asyncio.run(k8s.delete("Job", NS, "x"))
    except PermissionError as exc:
        assert "not in API_CALLS" in str(exc)
    else:
        raise AssertionError("delete jobs should be refused")


def test_watch_namespace_selects_namespaced_or_cluster_wide_mode(monkeypatch):
    monkeypatch.setenv("WATCH_NAMESPACE", "")
    assert kopf_args(k8s.watched_namespaces()) == {"standalone": True, "clusterwide": True, "namespaces": []}
    monkeypatch.setenv("WATCH_NAMESPACE", " lab, ci ")
    assert kopf_args(k8s.watched_namespaces()) == {"standalone": True, "clusterwide": False,
                                                   "namespaces": ["lab", "ci"]}
