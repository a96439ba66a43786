"""The live operator on the emulated API server: waits that end, children that vanish or are held by
another owner, children the API server refuses, and experiments taking one GPU pool in turn."""
import asyncio

from djinn.spec import KIND

from kmock_cluster import experiment_spec

CPU = {"image": "djinn-bench:test", "gpu": False}  # no GPU: these experiments never queue for one another
QUOTA = ('jobs "refused-native-pytorch-n1" is forbidden: exceeded quota: gpu-quota, requested: '
         'requests.nvidia.com/gpu=1, used: requests.nvidia.com/gpu=1, limited: requests.nvidia.com/gpu=1')


def _cond(status: dict, type_: str) -> dict:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


def test_waits_end_vanished_children_return_foreign_ones_are_not_adopted_refusals_fail(e2e, s3_endpoint):
    async def scenario(h):
        kubelet = h.start_kubelet({"vanish-native-pytorch-n1": "hold"})
        kubelet.unready.update({"stuck-ray", "crashing-djinn-server"})
        # a Job of a deleted experiment of the same name, not yet collected by the garbage collector
        await h.k8s_create({"apiVersion": "batch/v1", "kind": "Job", "metadata": {
            "name": "reused-native-pytorch-n1", "namespace": "lab", "labels": {"djinn.io/experiment": "reused"},
            "ownerReferences": [{"apiVersion": "djinn.io/v1alpha1", "kind": KIND, "name": "reused",
                                 "uid": "uid-of-the-deleted-one", "controller": True}]},
            "spec": {"template": {"spec": {"containers": []}}}, "status": {"conditions": [
                {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}})
        h.k.refuse("jobs", "refused-native-pytorch-n1", 403, "Forbidden", QUOTA)
        native = dict(baselines=["native_pytorch"], agentCounts=[1], cluster=CPU)
        await h.create_experiment("stuck", experiment_spec(s3_endpoint, baselines=["ray_keepalive"], agentCounts=[1],
                                                           cluster={**CPU, "rayReadyDeadlineSeconds": 2}))
        for name in ("vanish", "reused", "refused"):
            await h.create_experiment(name, experiment_spec(s3_endpoint, **native))
        await h.create_experiment("crashing", experiment_spec(s3_endpoint, baselines=["djinn_agents"], agentCounts=[1],
                                                              cluster=CPU))
        await h.wait("crashing server", lambda: h.get("Deployment", "crashing-djinn-server"))
        labels = (await h.get("Deployment", "crashing-djinn-server"))["spec"]["template"]["metadata"]["labels"]
        await h.k8s_create({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": "crashing-djinn-server-7d9f-abcde", "namespace": "lab", "labels": labels},
            "spec": {"containers": [{"name": "djinn-server", "image": "x"}]},
            "status": {"containerStatuses": [{"name": "djinn-server", "restartCount": 2, "lastState": {"terminated": {
                "exitCode": 2, "message": "loading...\ndjinn-server: model_id: 'org/gated' is neither a local model "
                                         "directory nor in the local HF cache\n"}}}]}})

        # a head that never gets ready: nothing changes in the cluster, yet the deadline fires
        status = await h.wait_phase("stuck", "Failed", timeout=15)
        assert _cond(status, "Failed")["reason"] == "RayClusterNotReady"
        assert "rayReadyDeadlineSeconds" in _cond(status, "Failed")["message"]
        await h.wait_events("stuck", lambda ev: ("Warning", "RayClusterNotReady") in [e[:2] for e in ev])

        # a server that keeps crashing fails at once, quoting its last words (not after its deadline)
        status = await h.wait_phase("crashing", "Failed", timeout=10)
        assert _cond(status, "Failed")["message"] == ("Djinn server crashing-djinn-server keeps crashing: djinn-server: "
                                                      "model_id: 'org/gated' is neither a local model directory nor "
                                                      "in the local HF cache")

        # a Job deleted mid-run is created again under its name, with no other trigger
        await h.wait("vanish running", lambda: h.get("Job", "vanish-native-pytorch-n1"))
        await h.delete("Job", "vanish-native-pytorch-n1")
        await h.wait("vanish re-created", lambda: h.get("Job", "vanish-native-pytorch-n1"), timeout=10)
        assert h.created("jobs").count("vanish-native-pytorch-n1") == 2
        kubelet.outcomes.clear()
        assert (await h.wait_phase("vanish", "Succeeded", "Failed"))["phase"] == "Succeeded"

        # another owner's Job is never adopted: the experiment waits, says why, and goes on once it is gone
        conflict = await h.wait("ChildConflict", lambda: _conflict(h))
        assert "Job/reused-native-pytorch-n1" in conflict["message"] and "another owner" in conflict["message"]
        assert (await h.get("Job", "reused-native-pytorch-n1"))["metadata"]["ownerReferences"][0]["uid"] \
            == "uid-of-the-deleted-one"
        assert (await h.status("reused"))["phase"] == "Running"  # not failed by the old Job's failure
        await h.delete("Job", "reused-native-pytorch-n1")  # the garbage collector's turn
        status = await h.wait_phase("reused", "Succeeded", "Failed")
        assert status["phase"] == "Succeeded" and not _cond(status, "ChildConflict")
        await h.wait_events("reused", lambda ev: ("Warning", "ChildConflict") in [e[:2] for e in ev])

        # a child the API server refuses: its message in a condition and a Warning at once, Failed after 3 tries
        status = await h.wait_phase("refused", "Failed", timeout=15)
        rejected, failed = _cond(status, "ChildRejected"), _cond(status, "Failed")
        assert failed["reason"] == "ChildRejected" and "exceeded quota: gpu-quota" in failed["message"]
        assert "403 Forbidden" in rejected["message"] and "try 3 of 3" in rejected["message"]
        events = await h.wait_events("refused", lambda ev: ("Warning", "RunFailed") in [e[:2] for e in ev])
        warnings = [e[1] for e in events if e[0] == "Warning"]
        assert warnings.count("ChildRejected") == 4 and warnings.count("RunFailed") == 1  # 3 tries, then Failed
        assert _cond(status, "Progressing")["status"] == "False" and _cond(status, "Ready")["status"] == "False"
        assert h.created("jobs").count("refused-native-pytorch-n1") == 3 and not await h.get("Job", "refused-native-pytorch-n1")
        assert status["runs"][0]["state"] == "Failed" and status["runs"][0]["reason"] == "ChildRejected"

    e2e(scenario, timeout=90)


async def _conflict(h):
    return _cond(await h.status("reused"), "ChildConflict")


def test_experiments_take_the_gpu_pool_in_turn_across_restarts_and_kueue_admits_its_own(e2e, s3_endpoint):
    async def scenario(h):
        kubelet = h.start_kubelet({"first-native-pytorch-n1": "hold", "second-native-pytorch-n1": "hold"})
        gpu = dict(baselines=["native_pytorch"], agentCounts=[1])
        for name in ("first", "second", "third"):
            await h.create_experiment(name, experiment_spec(s3_endpoint, **gpu))
            await asyncio.sleep(1.1)  # creationTimestamp has one-second resolution: the queue's order
        kueue = experiment_spec(s3_endpoint, **gpu, cluster={"image": "djinn-bench:test", "queueName": "gpu-queue"})
        await h.create_experiment("kueued", kueue)

        await h.wait("first running", lambda: h.get("Job", "first-native-pytorch-n1"))
        second = await h.wait_phase("second", "Queued")
        assert _cond(second, "Queued")["message"].endswith("held by lab/first; position 1")
        third = await h.wait_phase("third", "Queued")
        assert _cond(third, "Queued")["message"].endswith("held by lab/first; position 2")
        await h.wait_events("third", lambda ev: ("Normal", "Queued") in [e[:2] for e in ev])

        # Kueue's experiment is left to Kueue: labelled, suspended Jobs, no turn-taking of ours
        job = await h.wait("kueued job", lambda: h.get("Job", "kueued-native-pytorch-n1"))
        assert job["spec"]["suspend"] is True
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
        assert job["spec"]["template"]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"

        await h.stop_operator(kill=True)  # the queue lives in the cluster, not in the operator
        await h.start_operator()
        await asyncio.sleep(2)
        assert (await h.status("second"))["phase"] == "Queued" and (await h.status("third"))["phase"] == "Queued"
        assert await h.get("Job", "second-native-pytorch-n1") is None

        kubelet.outcomes.pop("first-native-pytorch-n1")  # the holder finishes: the next in line starts
        await h.wait_phase("first", "Succeeded")
        await h.wait("second running", lambda: h.get("Job", "second-native-pytorch-n1"), timeout=10)
        third = await h.wait("third behind second", lambda: _queued_behind(h, "third", "lab/second"))
        assert third["message"].endswith("position 1")
        await h.delete(KIND, "second")  # a holder deleted mid-run also hands the pool on
        status = await h.wait_phase("third", "Succeeded", timeout=15)
        assert _cond(status, "Queued")["status"] == "False"
        # GPU Jobs of first, second and third never ran together
        gpu_jobs = [n for n in h.created("jobs") if not n.startswith("kueued") and not n.endswith("analysis")]
        assert gpu_jobs == ["first-native-pytorch-n1", "second-native-pytorch-n1", "third-native-pytorch-n1"]

    e2e(scenario, timeout=90)


async def _queued_behind(h, name, holder):
    cond = _cond(await h.status(name), "Queued")
    return cond if cond.get("status") == "True" and f"held by {holder};" in cond["message"] else None


def test_a_results_store_that_refuses_fails_before_any_job_and_never_holds_the_gpu(e2e, s3_endpoint):
    async def scenario(h):
        h.start_kubelet()
        gpu = dict(baselines=["native_pytorch"], agentCounts=[1])
        nobucket = experiment_spec(s3_endpoint, **gpu)
        nobucket["output"]["uri"] = "s3://no-such-bucket/x"
        await h.create_experiment("nobucket", nobucket)
        await asyncio.sleep(1.1)  # creationTimestamp has one-second resolution: nobucket is first in line
        await h.create_experiment("after", experiment_spec(s3_endpoint, **gpu))

        status = await h.wait_phase("nobucket", "Failed")
        failed = _cond(status, "Failed")
        assert failed["reason"] == "ResultStoreError" and "\n" not in failed["message"]
        assert failed["message"].startswith("results store s3://no-such-bucket/x/lab/nobucket: NoSuchBucket: ")
        await h.wait_events("nobucket", lambda ev: ("Warning", "ResultStoreError") in [e[:2] for e in ev])
        assert (await h.wait_phase("after", "Succeeded", "Failed"))["phase"] == "Succeeded"
        assert not [n for n in h.created("jobs") if n.startswith("nobucket")]  # no GPU time spent on it

    e2e(scenario)
