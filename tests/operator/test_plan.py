"""The state machine, driven by an in-memory cluster (pure: no server, no S3)."""
from typing import Optional

import pytest

from djinn.spec import KIND
from djinn_operator import plan, pods, raycluster
from djinn_operator.status import Run, Status, set_condition
from djinn_operator.results import pick_key

NOW = "2026-11-22T10:00:00Z"
OUT = {"uri": "s3://bkt/pre"}
FAILED_JOB = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
              "message": "Job has reached the specified backoff limit"}


class Sim:
    """Reconciles like reconcile.py against a dict of objects; plays kubelet with per-job outcomes."""

    def __init__(self, spec: dict, outcomes: Optional[dict] = None):
        self.spec, self.outcomes, self.status = spec, outcomes or {}, {}
        self.objs: dict[tuple[str, str], dict] = {}
        self.log: list[tuple[str, str]] = []

    def observe(self, exp, st) -> plan.Observed:
        job = result = analysis = None
        i = plan.current(st)
        if i is not None and st.runs[i].state == "Running":
            run = st.runs[i]
            job = self.objs.get(("Job", run.job))
            outcome = self.outcomes.get(run.job, "ok")
            if plan.job_outcome(job)[0] == "Succeeded" and outcome in ("ok", "oom", "error"):
                result = plan.Result(key=f"results/{run.baseline}/20261122T100000000000Z-abc_n{run.n}.json",
                                     oom=outcome == "oom", error="DjinnError: the KV cache is full" if outcome == "error" else None)
        if st.analysis and st.analysis.state == "Running":
            analysis = self.objs.get(("Job", st.analysis.job))
        return plan.Observed(job=job, result=result, analysis=analysis,
                             server=self.objs.get(("Deployment", exp.server_name)),
                             service=self.objs.get(("Service", exp.server_name)),
                             auth_secret=self.objs.get(("Secret", exp.token_secret)), new_token="t0ken",
                             ray=self.objs.get(("RayCluster", exp.ray_name)))

    def reconcile(self) -> list[plan.Action]:
        st, exp = plan.prepare("exp1", "lab", self.spec, self.status, NOW)
        actions = []
        if exp is not None:
            st, actions = plan.advance(exp, st, self.observe(exp, st), NOW)
        self.status = {k: v for k, v in st.to_dict().items() if v is not None}
        for a in actions:
            if isinstance(a, plan.Create):
                key = (a.obj["kind"], a.obj["metadata"]["name"])
                assert key not in self.objs, f"second create of {key}"
                self.objs[key] = a.obj
                self.log.append(("create", f"{key[0]}/{key[1]}"))
            elif isinstance(a, plan.Delete):
                del self.objs[(a.kind, a.name)]
                self.log.append(("delete", f"{a.kind}/{a.name}"))
            else:
                self.objs[("RayCluster", a.name)]["spec"]["suspend"] = a.suspend
                self.log.append(("suspend" if a.suspend else "resume", a.name))
        return actions

    def kubelet(self) -> None:
        running = [n for (kind, n), o in self.objs.items() if kind == "Job" and not o.get("status")]
        assert len(running) <= 1, f"more than one Job at a time: {running}"
        for (kind, name), obj in self.objs.items():
            if kind == "Job" and not obj.get("status") and self.outcomes.get(name) != "hold":
                failed = self.outcomes.get(name) == "fail"
                obj["status"] = {"conditions": [FAILED_JOB if failed else {"type": "Complete", "status": "True"}]}
                self.log.append(("done", name))
            elif kind == "Deployment":
                obj["status"] = {"readyReplicas": 1}
            elif kind == "RayCluster":
                obj["status"] = {"state": "suspended" if obj["spec"]["suspend"] else "ready"}

    def run(self, steps: int = 100) -> dict:
        for _ in range(steps):
            self.reconcile()
            if self.status["phase"] in plan.FINISHED:
                self.reconcile()  # releases what is left
                return self.status
            self.kubelet()
        raise AssertionError(f"no end after {steps} steps: {self.status}")

    def jobs(self) -> list[str]:
        return [n.split("/", 1)[1] for v, n in self.log if v == "create" and n.startswith("Job/")]


def spec(**kw) -> dict:
    return {"baselines": ["native_pytorch", "ray_keepalive", "djinn_agents", "full_djinn"],
            "agentCounts": [1, 2, 4], "output": OUT, **kw}


def test_runs_are_planned_by_family_then_spec_order_then_n():
    st, _ = plan.prepare("exp1", "lab", spec(baselines=["full_djinn", "ray_serverless", "djinn_agents",
                                                         "native_pytorch", "ray_keepalive"], agentCounts=[4, 1]),
                         {}, NOW)
    assert [(r.baseline, r.n) for r in st.runs] == [
        ("native_pytorch", None), ("native_pytorch", 1), ("native_pytorch", 4), ("ray_serverless", 1), ("ray_serverless", 4),
        ("ray_keepalive", 1), ("ray_keepalive", 4), ("full_djinn", None), ("djinn_agents", 1), ("djinn_agents", 4)]
    assert st.results_uri == "s3://bkt/pre/lab/exp1" and st.phase == "Pending"
    assert st.children.server == "exp1-djinn-server" and st.children.ray == "exp1-ray"


def test_phased_experiment_one_job_at_a_time_with_oom_skip_and_analysis():
    sim = Sim(spec(), outcomes={"exp1-ray-keepalive-n2": "oom"})
    status = sim.run()
    assert status["phase"] == "Succeeded" and status["progress"] == "11/11"
    assert sim.jobs() == ["exp1-native-pytorch", "exp1-native-pytorch-n1", "exp1-native-pytorch-n2", "exp1-native-pytorch-n4",
                          "exp1-ray-keepalive-n1", "exp1-ray-keepalive-n2",
                          "exp1-djinn-agents-n1", "exp1-djinn-agents-n2", "exp1-djinn-agents-n4",
                          "exp1-full-djinn", "exp1-analysis"]
    states = {r["job"]: (r["state"], r.get("reason")) for r in status["runs"]}
    assert states["exp1-ray-keepalive-n2"] == ("OOM", None)
    assert states["exp1-ray-keepalive-n4"] == ("Skipped", "stopOnOom: OOM at n=2")
    assert all(r.get("resultKey", "").startswith(f"results/{r['baseline']}/") for r in status["runs"]
               if r["state"] in ("Succeeded", "OOM"))
    log = sim.log
    # GPU holders never overlap: Ray only after the native jobs, suspended before the server starts
    assert log.index(("create", "RayCluster/exp1-ray")) > log.index(("done", "exp1-native-pytorch-n4"))
    assert log.index(("suspend", "exp1-ray")) < log.index(("create", "Deployment/exp1-djinn-server"))
    assert log.index(("delete", "Deployment/exp1-djinn-server")) < log.index(("create", "Job/exp1-analysis"))
    assert status["analysis"]["state"] == "Succeeded" and "current" not in status
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["Complete"]["status"] == "True" and conds["Progressing"]["status"] == "False"


def test_djinn_sweep_runs_doubled_n_and_stops_at_its_first_failure_without_failing_the_experiment():
    sim = Sim(spec(baselines=["djinn_agents"], agentCounts=[1, 2], djinnSweepCap=16),
              outcomes={"exp1-djinn-agents-n8": "error"})
    status = sim.run()
    assert status["phase"] == "Succeeded"
    assert sim.jobs() == ["exp1-djinn-agents-n1", "exp1-djinn-agents-n2", "exp1-djinn-agents-n4",
                          "exp1-djinn-agents-n8", "exp1-analysis"]
    states = {r["job"]: (r["state"], r.get("reason")) for r in status["runs"]}
    assert states["exp1-djinn-agents-n8"] == ("Failed", "SweepLimit")
    assert states["exp1-djinn-agents-n16"] == ("Skipped", "djinnSweepCap: first failure at n=8")
    # without the sweep the same failure is the experiment's
    sim = Sim(spec(baselines=["djinn_agents"], agentCounts=[1, 2, 8]), outcomes={"exp1-djinn-agents-n8": "error"})
    assert sim.run()["phase"] == "Failed"


@pytest.mark.parametrize("outcome", ["fail", "missing"])  # its pod killed (OOM, deadline), or no document
def test_a_swept_n_that_fails_any_other_way_is_the_sweeps_limit_too(outcome):
    sim = Sim(spec(baselines=["djinn_agents"], agentCounts=[1], djinnSweepCap=8),
              outcomes={"exp1-djinn-agents-n2": outcome})
    status = sim.run()
    states = {r["job"]: (r["state"], r.get("reason")) for r in status["runs"]}
    assert status["phase"] == "Succeeded" and sim.jobs()[-1] == "exp1-analysis"
    assert states["exp1-djinn-agents-n2"] == ("Failed", "SweepLimit")
    assert states["exp1-djinn-agents-n4"] == states["exp1-djinn-agents-n8"] == \
        ("Skipped", "djinnSweepCap: first failure at n=2")


def test_separate_placement_starts_both_holders_up_front():
    sim = Sim(spec(baselines=["ray_serverless", "djinn_agents"], agentCounts=[1],
                   cluster={"gpuPlacement": "separate"}))
    acts = sim.reconcile()
    kinds = [a.obj["kind"] for a in acts if isinstance(a, plan.Create)]
    assert kinds == ["RayCluster", "Secret", "Service", "Deployment"] and sim.status["phase"] == "Provisioning"
    assert sim.run()["phase"] == "Succeeded"
    assert raycluster.is_suspended(sim.objs[("RayCluster", "exp1-ray")])
    assert ("Deployment", "exp1-djinn-server") not in sim.objs


def test_failed_job_fails_the_experiment_and_releases_the_gpu():
    sim = Sim(spec(baselines=["djinn_agents"]), outcomes={"exp1-djinn-agents-n2": "fail"})
    status = sim.run()
    runs = {r["job"]: r for r in status["runs"]}
    assert runs["exp1-djinn-agents-n2"]["state"] == "Failed"
    assert runs["exp1-djinn-agents-n2"]["reason"] == "BackoffLimitExceeded"
    assert runs["exp1-djinn-agents-n4"]["state"] == "Pending" and "exp1-analysis" not in sim.jobs()
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "RunFailed" and "BackoffLimitExceeded" in failed["message"]
    assert ("Deployment", "exp1-djinn-server") not in sim.objs


def test_succeeded_job_without_result_is_result_missing():
    status = Sim(spec(baselines=["native_pytorch"], agentCounts=[1]),
                 outcomes={"exp1-native-pytorch-n1": "missing"}).run()
    assert status["phase"] == "Failed" and status["runs"][0]["reason"] == "ResultMissing"


def test_analysis_failure_fails_the_experiment():
    status = Sim(spec(baselines=["native_pytorch"], agentCounts=[1]), outcomes={"exp1-analysis": "fail"}).run()
    assert status["phase"] == "Failed" and status["analysis"]["state"] == "Failed"


def test_stuck_server_fails_with_server_not_ready():
    sim = Sim(spec(baselines=["djinn_agents"], agentCounts=[1]))
    sim.reconcile()
    sim.objs[("Deployment", "exp1-djinn-server")]["status"] = {"conditions": [
        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]}
    sim.reconcile()
    assert sim.status["phase"] == "Failed"
    assert next(c for c in sim.status["conditions"] if c["type"] == "Failed")["reason"] == "ServerNotReady"
    assert ("Deployment", "exp1-djinn-server") not in sim.objs


def test_running_run_whose_job_is_missing_gets_it_created_under_the_same_name():
    """The operator died after recording the run as Running but before creating its Job."""
    sim = Sim(spec(baselines=["native_pytorch"], agentCounts=[1]))
    sim.reconcile()
    del sim.objs[("Job", "exp1-native-pytorch-n1")]
    acts = sim.reconcile()
    assert [a.obj["metadata"]["name"] for a in acts] == ["exp1-native-pytorch-n1"]
    assert sim.reconcile() == []  # nothing more while it runs


@pytest.mark.parametrize("bad,message", [
    ({"agentCounts": [2, -1]}, "spec.agentCounts: agent counts must be between 1 and 4096, got -1"),
    ({"baselines": ["warp_drive"]}, "spec.baselines[0]: Input should be "),
    ({"output": None}, "spec.output"),
    ({"output": {"uri": "/tmp/results"}}, "spec.output.uri: the operator needs s3://bucket/prefix"),
    ({"device": "cuda", "cluster": {"gpu": False}}, "spec.device: cuda needs a GPU but cluster.gpu is false"),
    ({"rayAddress": "auto"}, "spec.rayAddress: 'auto' would point inside each Job's pod"),
    ({"rayAddress": "ray://127.0.0.1:10001"}, "spec.rayAddress: 'ray://127.0.0.1:10001' would point inside"),
    ({"djinnServer": "localhost:5556"}, "spec.djinnServer: 'localhost:5556' would point inside each Job's pod"),
    ({"djinnServer": "0.0.0.0:5556"}, "spec.djinnServer: '0.0.0.0:5556' would point inside"),
    ({"djinnServer": "[::ffff:127.0.0.1]:5556"}, "spec.djinnServer: '[::ffff:127.0.0.1]:5556' would point inside"),
    ({"djinnServer": "2130706433:5556"}, "spec.djinnServer: '2130706433:5556' would point inside"),
    ({"rayAddress": "ray://LOCALHOST.:10001"}, "spec.rayAddress: 'ray://LOCALHOST.:10001' would point inside"),
    ({"agentCounts": list(range(1, 66))}, "spec.agentCounts: at most 64 items, got 65; give fewer"),
    ({"prompt": "x" * 100_000}, "spec: 100790 bytes as JSON, over the 98304 every Job takes it in (one command-line"),
    ({"sleepSeconds": 3600, "iterations": 2}, "spec.cluster.activeDeadlineSeconds: 7200 s, but the run at N=1 sleeps "
                                              "7200 s in Act alone (1 rounds x 2 iterations x sleepSeconds 3600)"),
    ({"sleepSeconds": 60, "minSteps": 240, "cluster": {"activeDeadlineSeconds": 3600}},
     "spec.cluster.activeDeadlineSeconds: 3600 s, but the run at N=1 sleeps 7200 s in Act alone (120 rounds x"),
])
def test_invalid_spec_fails_with_one_line(bad, message):
    raw = {k: v for k, v in {**spec(), **bad}.items() if v is not None}
    sim = Sim(raw)
    assert sim.reconcile() == []
    failed = next(c for c in sim.status["conditions"] if c["type"] == "Failed")
    assert sim.status["phase"] == "Failed" and failed["reason"] == "InvalidSpec"
    assert failed["message"].startswith(message) and "\n" not in failed["message"]
    assert not sim.status.get("runs") and not sim.objs
    before = dict(sim.status)
    sim.reconcile()
    assert sim.status == before  # nothing to do until the spec changes
    sim.spec = spec(baselines=["native_pytorch"], agentCounts=[1])  # fixed: planned now
    assert sim.run()["phase"] == "Succeeded"


def test_spec_update_after_planning_is_refused():
    sim = Sim(spec(baselines=["native_pytorch"], agentCounts=[1, 2]))
    sim.reconcile()
    sim.spec = {**sim.spec, "agentCounts": [1, 2, 4]}
    sim.reconcile()
    refused = next(c for c in sim.status["conditions"] if c["type"] == "SpecUpdateRefused")
    assert refused["status"] == "True" and KIND in refused["message"]
    assert len(sim.status["runs"]) == 2
    sim.spec = spec(baselines=["native_pytorch"], agentCounts=[1, 2])  # reverted
    sim.reconcile()
    assert "SpecUpdateRefused" not in {c["type"] for c in sim.status["conditions"]}


def test_conditions_keep_their_transition_time():
    st = Status()
    set_condition(st, "Progressing", "True", "Running", "a", "t1")
    set_condition(st, "Progressing", "True", "Running", "b", "t2")
    assert st.conditions[0].last_transition_time == "t1" and st.conditions[0].message == "b"
    set_condition(st, "Progressing", "False", "Succeeded", "", "t3")
    assert st.conditions[0].last_transition_time == "t3" and len(st.conditions) == 1


def test_result_key_is_the_newest_of_this_run_since_it_started():
    run = Run(baseline="ray_keepalive", n=2, job="j", started_at="2026-11-22T10:00:00Z")
    keys = ["results/ray_keepalive/20261122T095000000000Z-aaaaaa_n2.json",  # an older experiment
            "results/ray_keepalive/20261122T100100000000Z-bbbbbb_n2.json",
            "results/ray_keepalive/20261122T100200000000Z-cccccc_n2.json",
            "results/ray_keepalive/20261122T100300000000Z-dddddd_n4.json",
            "results/ray_serverless/20261122T100400000000Z-eeeeee_n2.json"]
    assert pick_key(keys, run) == keys[2]
    assert pick_key(keys[:1], run) is None
    decode = Run(baseline="full_djinn", job="j")
    assert pick_key(["results/full_djinn/20261122T100100000000Z-ab.json",
                     "results/full_djinn/20261122T100200000000Z-cd_n1.json"], decode) \
        == "results/full_djinn/20261122T100100000000Z-ab.json"


@pytest.mark.parametrize("waited, failed", [(901, True), (899, False)])
def test_a_ray_head_that_never_gets_ready_fails_at_its_deadline(waited, failed):
    """The clock starts with the wait; the periodic reconcile makes it fire with no cluster change."""
    st, exp = plan.prepare("exp1", "lab", spec(baselines=["ray_keepalive"], agentCounts=[1]), {}, NOW)
    stuck = {"metadata": {"name": exp.ray_name}, "spec": {}, "status": {}}
    st, _ = plan.advance(exp, st, plan.Observed(ray=stuck), NOW)
    assert st.phase == "Provisioning" and st.waiting_since == NOW
    later = f"2026-11-22T10:{waited // 60:02d}:{waited % 60:02d}Z"
    st, _ = plan.advance(exp, st, plan.Observed(ray=stuck), later)
    reasons = [c.reason for c in st.conditions if c.type == "Failed" and c.status == "True"]
    assert (st.phase == "Failed") is failed and (reasons == ["RayClusterNotReady"]) is failed
    if failed:
        assert "rayReadyDeadlineSeconds" in st.conditions[-1].message or any(
            "rayReadyDeadlineSeconds" in c.message for c in st.conditions)


def test_server_deadline_counts_from_the_wait_and_a_lost_service_comes_back():
    sim = Sim(spec(baselines=["djinn_agents"], agentCounts=[1], cluster={"serverReadyDeadlineSeconds": 60}))
    sim.reconcile()
    del sim.objs[("Service", "exp1-djinn-server")]  # deleted by hand: created again, alone
    assert [a.target for a in sim.reconcile()] == ["Service/exp1-djinn-server"]
    st, exp = plan.prepare("exp1", "lab", sim.spec, sim.status, NOW)
    observed = sim.observe(exp, st)
    st, _ = plan.advance(exp, st, observed, "2026-11-22T10:00:59Z")
    assert st.phase == "Provisioning"
    st, _ = plan.advance(exp, st, observed, "2026-11-22T10:01:01Z")
    failed = next(c for c in st.conditions if c.type == "Failed")
    assert st.phase == "Failed" and failed.reason == "ServerNotReady" and "serverReadyDeadlineSeconds" in failed.message


def test_a_queued_experiment_creates_nothing_until_its_turn():
    st, exp = plan.prepare("exp1", "lab", spec(), {}, NOW)
    assert plan.holds_gpu(exp) and plan.pool(exp) == "any node"
    st, actions = plan.advance(exp, st, plan.Observed(turn=plan.Turn("lab/other", 2)), NOW)
    assert actions == [] and st.phase == "Queued" and not plan.started(st)
    queued = next(c for c in st.conditions if c.type == "Queued")
    assert queued.status == "True" and queued.message.endswith("held by lab/other; position 2")
    st, actions = plan.advance(exp, st, plan.Observed(), NOW)  # our turn
    assert st.phase == "Running" and [a.target for a in actions] == ["Job/exp1-native-pytorch"]
    assert next(c for c in st.conditions if c.type == "Queued").status == "False"
    st, _ = plan.advance(exp, st, plan.Observed(turn=plan.Turn("lab/other", 1)), NOW)
    assert st.phase == "Running"  # once started, an experiment keeps its pool
    cpu = plan.prepare("c", "lab", spec(cluster={"gpu": False}), {}, NOW)[1]
    external = plan.prepare("x", "lab", spec(baselines=["djinn_agents"], djinnServer="djinn:5556"), {}, NOW)[1]
    assert not plan.holds_gpu(cpu) and not plan.holds_gpu(external)


def test_a_child_of_another_owner_is_neither_created_nor_adopted_and_its_wait_has_a_deadline():
    sim = Sim(spec(baselines=["native_pytorch"], agentCounts=[1]))
    st, exp = plan.prepare("exp1", "lab", sim.spec, {}, NOW)
    foreign = plan.Observed(foreign=("Job/exp1-native-pytorch-n1",))
    st, actions = plan.advance(exp, st, foreign, NOW)
    assert actions == [] and st.phase == "Running"
    assert next(c for c in st.conditions if c.type == "ChildConflict").reason == "OwnedByAnother"
    st, _ = plan.advance(exp, st, foreign, "2026-11-22T10:10:01Z")  # childConflictDeadlineSeconds 600
    assert st.phase == "Failed" and next(c for c in st.conditions if c.type == "Failed").reason == "ChildConflict"


def test_refusals_count_up_to_failed_and_an_accepted_write_clears_them():
    st, exp = plan.prepare("exp1", "lab", spec(baselines=["native_pytorch"], agentCounts=[1]), {}, NOW)
    st, actions = plan.advance(exp, st, plan.Observed(), NOW)
    refused = plan.rejected(st, actions[0], "422 Unprocessable Entity: spec.x: Invalid value", NOW)
    assert refused.phase == "Running" and refused.child_rejections == 1
    assert plan.accepted(refused).child_rejections == 0
    assert not [c for c in plan.accepted(refused).conditions if c.type == "ChildRejected"]
    for _ in range(plan.MAX_CHILD_REJECTIONS - 1):
        refused = plan.rejected(refused, actions[0], "422 Unprocessable Entity: spec.x: Invalid value", NOW)
    assert refused.phase == "Failed" and refused.runs[0].state == "Failed" and refused.runs[0].reason == "ChildRejected"
    ready = {c.type: c.status for c in refused.conditions}
    assert (ready["Ready"], ready["Progressing"], ready["Failed"]) == ("False", "False", "True")


def test_events_tell_phase_changes_runs_and_new_problems_once():
    old, exp = plan.prepare("exp1", "lab", spec(baselines=["native_pytorch"], agentCounts=[1]), {}, NOW)
    new, _ = plan.advance(exp, old, plan.Observed(), NOW)
    assert [(e.type, e.reason) for e in plan.events(old, new)] == [("Normal", "RunStarted"), ("Normal", "Running")]
    assert plan.events(new, new) == []
    refused = plan.rejected(new, plan.Delete("Job", "j"), "403 Forbidden: no", NOW)
    assert [(e.type, e.reason) for e in plan.events(new, refused)] == [("Warning", "ChildRejected")]


def test_a_sweep_finding_djinns_limit_is_a_normal_event_and_any_other_failed_run_a_warning():
    old, _ = plan.prepare("exp1", "lab", spec(baselines=["djinn_agents"], agentCounts=[1], djinnSweepCap=2), {}, NOW)
    old.runs[0].state = "Running"
    new = old.model_copy(deep=True)
    new.runs[0].state, new.runs[0].reason = "Failed", "SweepLimit"
    assert [(e.type, e.reason) for e in plan.events(old, new)] == [("Normal", "SweepLimit")]
    new.runs[0].reason = "RunError"
    assert [(e.type, e.reason) for e in plan.events(old, new)] == [("Warning", "RunFailed")]


def test_weights_auto_is_made_explicit_at_planning_and_pretrained_needs_a_source():
    st, exp = plan.prepare("exp1", "lab", spec(), {}, NOW)
    assert exp.spec.weights == "synthetic" and st.weights.startswith("synthetic: sshleifer/tiny-gpt2")
    assert '"weights":"synthetic"' in st.planned_spec  # what every Job runs with: no silent fallback
    st, exp = plan.prepare("exp1", "lab", spec(cluster={"modelClaim": "llama-weights"}), {}, NOW)
    assert exp.spec.weights == "pretrained"
    assert st.weights == "pretrained: sshleifer/tiny-gpt2 from PersistentVolumeClaim llama-weights at /models"
    st, exp = plan.prepare("exp1", "lab", spec(weights="pretrained"), {}, NOW)
    failed = next(c for c in st.conditions if c.type == "Failed")
    assert exp is None and failed.message.startswith("spec.weights: pretrained needs the weights in the pods")


def test_a_failed_runs_reason_quotes_its_document_or_its_pod():
    sim = Sim(spec(baselines=["native_pytorch"], agentCounts=[1]), outcomes={"exp1-native-pytorch-n1": "fail"})
    sim.reconcile()
    sim.kubelet()
    st, exp = plan.prepare("exp1", "lab", sim.spec, sim.status, NOW)
    said = "djinn-bench: model_id: 'x' is neither a local model directory nor in the local HF cache"
    st, _ = plan.advance(exp, st, plan.Observed(job=sim.objs[("Job", "exp1-native-pytorch-n1")], job_message=said),
                         NOW)
    failed = next(c for c in st.conditions if c.type == "Failed")
    assert failed.message.endswith("BackoffLimitExceeded: Job has reached the specified backoff limit; " + said)
    # a Job that exits 0 but whose document records a failure is a failed run too
    st, exp = plan.prepare("exp1", "lab", spec(baselines=["native_pytorch"], agentCounts=[1]), {}, NOW)
    st, _ = plan.advance(exp, st, plan.Observed(), NOW)
    done = {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    st, _ = plan.advance(exp, st, plan.Observed(job=done, result=plan.Result("k", False, "boom")), NOW)
    assert st.phase == "Failed" and st.runs[0].reason == "RunError" and st.runs[0].result_key == "k"


def _pod(created, restarts, message, code=1, state="lastState"):
    return {"metadata": {"creationTimestamp": created}, "status": {"containerStatuses": [
        {"restartCount": restarts, state: {"terminated": {"exitCode": code, "message": message}}}]}}


def test_last_words_come_from_the_newest_failed_container_and_a_crash_loop_needs_two_exits():
    old, new = _pod("t1", 0, "old failure", state="state"), _pod("t2", 0, "Traceback\n  ...\nValueError: bad\n\n")
    assert pods.last_words([old, new]) == "ValueError: bad"
    assert pods.last_words([_pod("t1", 0, "all good", code=0, state="state")]) is None
    assert pods.crash_loop([_pod("t1", 1, "djinn-server: cannot load")]) is None  # one exit: maybe a blip
    assert pods.crash_loop([_pod("t1", 2, "djinn-server: cannot load")]) == "djinn-server: cannot load"


LATER = "2026-11-22T10:10:01Z"  # past plan.STORE_DEADLINE_S (600 s)
NO_BUCKET = plan.StoreProblem("NoSuchBucket: The specified bucket does not exist", permanent=True)
NO_ANSWER = plan.StoreProblem("EndpointConnectionError: Could not connect to the endpoint URL", permanent=False)


def _failed(st):
    return next(c for c in st.conditions if c.type == "Failed")


def test_a_results_store_that_refuses_fails_the_experiment_before_any_job():
    st, exp = plan.prepare("exp1", "lab", spec(baselines=["native_pytorch"], agentCounts=[1]), {}, NOW)
    st, actions = plan.advance(exp, st, plan.Observed(store=NO_BUCKET), NOW)
    assert actions == [] and st.phase == "Failed" and _failed(st).reason == "ResultStoreError"
    assert _failed(st).message == ("results store s3://bkt/pre/lab/exp1: NoSuchBucket: The specified bucket does not "
                                   "exist; check spec.output (uri, region, endpointUrl) and the operator's S3 access")
    assert st.runs[0].state == "Pending"  # nothing ran


def test_a_results_store_that_does_not_answer_is_waited_for_up_to_its_deadline():
    st, exp = plan.prepare("exp1", "lab", spec(baselines=["native_pytorch"], agentCounts=[1]), {}, NOW)
    running, _ = plan.advance(exp, st, plan.Observed(), NOW)  # the run started
    done = {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    st, actions = plan.advance(exp, running, plan.Observed(job=done, store=NO_ANSWER), NOW)
    waiting = next(c for c in st.conditions if c.type == "ResultStoreUnreachable")
    assert actions == [] and st.phase == "Running" and st.runs[0].state == "Running"  # not ResultMissing
    assert waiting.reason == "NoAnswer" and "EndpointConnectionError" in waiting.message
    assert [(e.type, e.reason) for e in plan.events(running, st)] == [("Warning", "ResultStoreUnreachable")]
    back, _ = plan.advance(exp, st, plan.Observed(job=done, result=plan.Result("k", False)), NOW)  # it came back
    assert back.runs[0].state == "Succeeded" and not [c for c in back.conditions if c.type == "ResultStoreUnreachable"]
    st, _ = plan.advance(exp, st, plan.Observed(job=done, store=NO_ANSWER), LATER)
    assert st.phase == "Failed" and _failed(st).reason == "ResultStoreError" and _failed(st).message.endswith(
        "no answer for 600 s")
    assert st.runs[0].state == "Failed" and st.runs[0].reason == "ResultStoreError"


def test_a_failed_job_does_not_wait_for_the_store_and_says_both():
    st, exp = plan.prepare("exp1", "lab", spec(baselines=["native_pytorch"], agentCounts=[1]), {}, NOW)
    st, _ = plan.advance(exp, st, plan.Observed(), NOW)
    failed_job = {"status": {"conditions": [FAILED_JOB]}}
    st, _ = plan.advance(exp, st, plan.Observed(job=failed_job, job_message="botocore: NoSuchBucket", store=NO_ANSWER),
                         NOW)
    assert st.phase == "Failed" and _failed(st).reason == "RunFailed" and st.runs[0].reason == "BackoffLimitExceeded"
    assert _failed(st).message.endswith("; botocore: NoSuchBucket; results store: " + NO_ANSWER.message)


def test_a_spec_fixed_to_another_invalid_one_tells_the_new_message():
    sim = Sim(spec(agentCounts=[-1]))
    sim.reconcile()
    old = Status.model_validate(sim.status)
    sim.spec = spec(agentCounts=[5000])
    sim.reconcile()
    new = Status.model_validate(sim.status)
    assert [(e.type, e.reason, e.message) for e in plan.events(old, new)] == [
        ("Warning", "InvalidSpec", "spec.agentCounts: agent counts must be between 1 and 4096, got 5000")]
    assert plan.events(new, new) == []


@pytest.mark.parametrize("edit, problem", [
    (lambda st: st.update(plannedSpec="garbage"), "status.plannedSpec: "),
    (lambda st: st["runs"][1].update(baseline="warp_drive"), "status.runs[1]: warp_drive n=2 as job"),
    (lambda st: st["runs"][0].update(job="ghost-job"), "status.runs[0]: native_pytorch n=1 as job 'ghost-job' is not"),
    (lambda st: st["analysis"].update(job="ghost-analysis"), "status.analysis.job: not the plan's analysis Job"),
    (lambda st: st["runs"][0].update(startedAt="yesterday"), "status.runs[0].startedAt: 'yesterday' is not a time"),
    (lambda st: st.update(waitingSince="not-a-time"), "status.waitingSince: 'not-a-time' is not a time"),
    (lambda st: st.update(runs=[]), "status.runs: empty, though planned"),
    (lambda st: st.update(phase="Succeeded"), "status.phase: Succeeded before its runs and analysis"),
    (lambda st: st.update(runs="x"), "status.runs: "),
])
def test_a_status_edited_by_hand_fails_once_with_what_was_edited(edit, problem):
    sim = Sim(spec(baselines=["native_pytorch"], agentCounts=[1, 2]), outcomes={"exp1-native-pytorch-n1": "hold"})
    sim.reconcile()
    edit(sim.status)
    assert sim.reconcile() == []  # nothing created from a record the operator did not write
    failed = next(c for c in sim.status["conditions"] if c["type"] == "Failed")
    assert sim.status["phase"] == "Failed" and failed["reason"] == "StatusEdited"
    assert failed["message"].startswith(problem) and "delete and re-create the experiment" in failed["message"]
    before = dict(sim.status)
    sim.reconcile()
    assert sim.status == before  # settled: no loop
