"""The experiment's state machine as pure functions: (spec, status, observed children) -> (status, actions).

Status is the only memory: child names are recorded in it before the child is created, so
a retry or a restarted operator finds (or re-creates under the same name) what it started.
Runs go one at a time in family order native -> ray -> djinn; with ``gpuPlacement: phased``
only the current family's GPU holder exists (the RayCluster is suspended and the Djinn
server deleted when their phase ends), with ``separate`` both live until their runs finish.

Every wait has a deadline counted from ``status.waitingSince``; the reconciler runs
periodically, so a deadline fires although nothing in the cluster changes.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Optional, Union

from pydantic import ValidationError

from djinn.runners import plan as run_plan
from djinn.spec import AGENT_BASELINES, DECODE_MODES, KIND, Baseline, ExperimentSpec, SpecError, parse_spec

from . import manifests, names, raycluster
from .manifests import Experiment, family
from .status import Analysis, Children, Current, Run, Status, condition, drop_condition, set_condition

DONE: frozenset[str] = frozenset({"Succeeded", "Failed", "OOM", "Skipped"})
FINISHED: frozenset[str] = frozenset({"Succeeded", "Failed"})
FAMILY_ORDER = ("native", "ray", "djinn")
MAX_CHILD_REJECTIONS = 3  # refused writes of a child in a row before the experiment fails (ChildRejected)
STORE_DEADLINE_S = 600  # an unreachable results store is waited for this long, then the experiment fails
MAX_SPEC_ARG = 96 << 10  # bytes of the spec every Job gets as one argument (Linux: 128 KiB per argument)


@dataclass(frozen=True)
class Result:
    """A result document found for a finished run."""

    key: str
    oom: bool
    error: Optional[str] = None  # the run's own one-line failure, when its document records one


@dataclass(frozen=True)
class StoreProblem:
    """The results store (S3) could not be read: its one line, and whether waiting cannot fix it."""

    message: str
    permanent: bool


@dataclass(frozen=True)
class Turn:
    """This experiment waits for its GPU pool: who holds it (or is next) and our place in line."""

    holder: str
    position: int


@dataclass(frozen=True)
class Observed:
    """What the reconciler read from the cluster and S3 for this step (None: absent).

    A child whose name is taken by an object of another owner (a deleted experiment's child the
    garbage collector has not removed yet) is never adopted: it reads as absent, listed in ``foreign``.
    """

    job: Optional[dict] = None           # Job of the Running run
    result: Optional[Result] = None      # its result document, looked up once the Job finished
    job_message: Optional[str] = None    # what its failed pod said last (termination message)
    server_crash: Optional[str] = None   # the server container's last words, once it crash-loops
    server: Optional[dict] = None        # Djinn server Deployment
    service: Optional[dict] = None       # its Service
    auth_secret: Optional[dict] = None   # its bearer-token Secret
    new_token: str = ""                  # a fresh token, used if that Secret must be created
    ray: Optional[dict] = None           # RayCluster
    analysis: Optional[dict] = None      # analysis Job
    foreign: tuple[str, ...] = ()        # "Kind/name" of children held by another owner
    turn: Optional[Turn] = None          # set while the GPU pool is someone else's turn
    store: Optional[StoreProblem] = None # the results store refused or did not answer (before start, at a result)


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event about the experiment (``kubectl describe ase``)."""

    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Create:
    obj: dict

    @property
    def target(self) -> str:
        return f"{self.obj['kind']}/{self.obj['metadata']['name']}"


@dataclass(frozen=True)
class Delete:
    kind: str
    name: str

    @property
    def target(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclass(frozen=True)
class Suspend:
    name: str
    suspend: bool

    @property
    def target(self) -> str:
        return f"RayCluster/{self.name}"


Action = Union[Create, Delete, Suspend]


def spec_hash(raw: Any) -> str:
    return hashlib.sha256(json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def validate(raw: Any) -> ExperimentSpec:
    """parse_spec plus what only the operator needs; SpecError carries one line."""
    spec = parse_spec(raw)
    if not spec.output.is_s3:
        raise SpecError("spec.output.uri: the operator needs s3://bucket/prefix (a local path would stay in the pod)")
    size = len(manifests.spec_json(spec).encode())
    if size > MAX_SPEC_ARG:
        raise SpecError(f"spec: {size} bytes as JSON, over the {MAX_SPEC_ARG} every Job takes it in (one command-line "
                        "argument); shorten spec.prompt or other long fields")
    if spec.device == "cuda" and not spec.cluster.gpu:
        raise SpecError("spec.device: cuda needs a GPU but cluster.gpu is false; set device: auto (or cpu), "
                        "or cluster.gpu: true")
    for field, address in (("rayAddress", spec.ray_address), ("djinnServer", spec.djinn_server)):
        if address is not None and _inside_the_pod(address):
            raise SpecError(f"spec.{field}: {address!r} would point inside each Job's pod; give an address the pods "
                            "reach (a Service's DNS name), or leave it unset for the operator to create one")
    if any(b in AGENT_BASELINES for b in spec.baselines):  # each agent run is a Job under activeDeadlineSeconds
        n = min(spec.agent_counts)  # the fewest agents run the most rounds (minSteps)
        rounds = run_plan.rounds(spec, n)
        slept = rounds * spec.iterations * spec.sleep_seconds
        if slept >= spec.cluster.active_deadline_seconds:
            raise SpecError(f"spec.cluster.activeDeadlineSeconds: {spec.cluster.active_deadline_seconds} s, but the run "
                            f"at N={n} sleeps {slept:g} s in Act alone ({rounds} rounds x "
                            f"{spec.iterations} iterations x sleepSeconds {spec.sleep_seconds:g}); raise it, or sleep or "
                            "iterate less")
    if spec.weights == "pretrained" and spec.cluster.pretrained_source is None and not spec.model_id.startswith("/"):
        raise SpecError("spec.weights: pretrained needs the weights in the pods: set cluster.modelClaim (a volume "
                        "holding them) or cluster.hfTokenSecret (download from the hub), or use weights: synthetic")
    return spec


def _inside_the_pod(address: str) -> bool:
    """``auto``, a loopback or an unspecified address: in a Job's pod, the pod itself."""
    host = address.removeprefix("ray://").rpartition(":")[0].strip("[]").lower().rstrip(".")
    if address == "auto" or host in ("localhost", "ip6-localhost") or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(int(host) if host.isdigit() else host)  # 2130706433 is 127.0.0.1 too
    except ValueError:
        return False
    ip = getattr(ip, "ipv4_mapped", None) or ip
    return ip.is_loopback or ip.is_unspecified


def resolve_weights(spec: ExperimentSpec) -> ExperimentSpec:
    """``weights: auto`` made explicit at planning, so no pod silently falls back: pretrained when the
    pods can reach weights (modelClaim, hfTokenSecret), else synthetic."""
    if spec.weights != "auto":
        return spec
    return spec.model_copy(update={"weights": "pretrained" if spec.cluster.pretrained_source else "synthetic"})


def weights_summary(spec: ExperimentSpec) -> str:
    if spec.weights == "synthetic":
        return f"synthetic: {spec.model_id}'s architecture with seeded random weights (seed {spec.seed})"
    return f"pretrained: {spec.model_id} from {spec.cluster.pretrained_source or 'the pod image'}"


def plan_runs(name: str, spec: ExperimentSpec) -> list[Run]:
    """Every run in execution order: families native, ray, djinn; baselines in spec order; N ascending.
    With decode modes, native_pytorch also runs the Experiment 2.1 reference (n None) first, and with
    djinnSweepCap djinn_agents also runs the swept N, as ``djinn-bench run`` does locally."""
    decode = any(b in DECODE_MODES for b in spec.baselines)
    runs = []
    for fam in FAMILY_ORDER:
        for b in (b.value for b in spec.baselines if family(b.value) == fam):
            counts: list[Optional[int]] = [None] if Baseline(b) in DECODE_MODES else \
                list(run_plan.agent_counts(spec, Baseline(b)))
            if b == Baseline.native_pytorch.value and decode:
                counts = [None, *counts]
            runs += [Run(baseline=b, n=n, job=names.run_job(name, b, n)) for n in counts]
    return runs


def current(st: Status) -> Optional[int]:
    return next((i for i, r in enumerate(st.runs) if r.state not in DONE), None)


def started(st: Status) -> bool:
    """Past the queue: some run left Pending (from then on the experiment holds its GPU pool)."""
    return any(r.state != "Pending" for r in st.runs) or st.phase in ("Provisioning", "Running", "Analyzing")


def holds_gpu(exp: Experiment) -> bool:
    """Whether any of the experiment's pods asks for a GPU of its pool (external server / Ray do not count)."""
    return exp.spec.cluster.gpu and bool(exp.server_name or exp.ray_name or any(
        family(b.value) == "native" for b in exp.spec.baselines))


def pool(exp: Experiment) -> str:
    """GPU pool key: experiments with the same node selector compete for the same GPUs."""
    return ",".join(f"{k}={v}" for k, v in sorted(exp.spec.cluster.node_selector.items())) or "any node"


def fail(st: Status, reason: str, message: str, now: str) -> None:
    st.phase = "Failed"
    set_condition(st, "Failed", "True", reason, message, now)
    set_condition(st, "Progressing", "False", "Failed", "", now)


def prepare(exp_name: str, namespace: str, raw: Any, status: dict, now: str
            ) -> tuple[Status, Optional[Experiment]]:
    """Plan on first sight (or after an invalid spec was fixed); afterwards keep the planned spec.

    A spec edited after planning is refused: condition SpecUpdateRefused, the plan continues.
    """
    h = spec_hash(raw)
    try:
        st, planned = _read(exp_name, status)
    except StatusEdited as exc:  # the status is the operator's only memory: one it did not write is not stepped on
        st = Status(phase="Failed", spec_hash=h)
        fail(st, "StatusEdited", f"{exc}; the operator's record of this experiment was changed by hand: delete "
                                 "and re-create the experiment (results written so far stay under its results URI)", now)
        summarize(st, now)
        return st, None
    if planned is None:
        if st.phase == "Failed" and st.spec_hash == h:
            return st, None
        try:
            spec = validate(raw)
        except SpecError as exc:
            st = Status(phase="Failed", spec_hash=h)
            set_condition(st, "Valid", "False", "InvalidSpec", str(exc), now)
            fail(st, "InvalidSpec", str(exc), now)
            summarize(st, now)
            return st, None
        exp = Experiment(exp_name, namespace, resolve_weights(spec))
        st = Status(spec_hash=h, planned_spec=exp.spec_json(), results_uri=exp.results_uri,
                    weights=weights_summary(exp.spec),
                    runs=plan_runs(exp_name, spec), analysis=Analysis(job=names.analysis_job(exp_name)),
                    children=Children(server=exp.server_name, ray=exp.ray_name))
        set_condition(st, "Valid", "True", "SpecValid", "", now)
        return st, exp
    exp = Experiment(exp_name, namespace, planned)
    if h != st.spec_hash:
        set_condition(st, "SpecUpdateRefused", "True", "PlanInProgress" if st.phase not in FINISHED else "Finished",
                      f"spec changed after planning; the {KIND} keeps its planned spec (status.plannedSpec); "
                      "create a new one to run the new spec", now)
    else:
        st.conditions = [c for c in st.conditions if c.type != "SpecUpdateRefused"]
    return st, exp


class StatusEdited(ValueError):
    """A status the operator cannot have written; the message names the field."""


def _read(exp_name: str, status: dict) -> tuple[Status, Optional[ExperimentSpec]]:
    """The stored status and its planned spec; StatusEdited when they are not what the operator writes."""
    try:
        st = Status.model_validate(status or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise StatusEdited(f"status.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None
    return st, _planned(exp_name, st)


def _planned(exp_name: str, st: Status) -> Optional[ExperimentSpec]:
    """The planned spec of ``st`` (None before planning), once the rest of the status is one the operator
    can have written: its runs and Jobs named by the plan, its times times, Succeeded after the analysis."""
    if st.planned_spec is None:
        return None
    try:
        spec = ExperimentSpec.model_validate_json(st.planned_spec)
    except ValidationError:
        raise StatusEdited("status.plannedSpec: not a spec the operator wrote") from None
    if not st.runs:
        raise StatusEdited("status.runs: empty, though planned")
    for i, r in enumerate(st.runs):
        if r.baseline not in Baseline.__members__ or r.job != names.run_job(exp_name, r.baseline, r.n):
            raise StatusEdited(f"status.runs[{i}]: {r.baseline} n={r.n} as job {r.job!r} is not a run of the plan")
    if st.analysis is None or st.analysis.job != names.analysis_job(exp_name):
        raise StatusEdited("status.analysis.job: not the plan's analysis Job")
    for field, stamp in [("waitingSince", st.waiting_since)] + [(f"runs[{i}].startedAt", r.started_at)
                                                                 for i, r in enumerate(st.runs)]:
        if stamp is not None:
            try:
                _time(stamp)
            except ValueError:
                raise StatusEdited(f"status.{field}: {stamp!r} is not a time") from None
    if st.phase == "Succeeded" and (st.analysis.state != "Succeeded" or any(r.state not in DONE for r in st.runs)):
        raise StatusEdited("status.phase: Succeeded before its runs and analysis")
    return spec


def job_outcome(job: Optional[dict]) -> tuple[str, str]:
    """(Missing|Running|Succeeded|Failed, reason) from a Job's terminal conditions."""
    if job is None:
        return "Missing", ""
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("status") == "True" and c.get("type") in ("Complete", "Failed"):
            if c["type"] == "Complete":
                return "Succeeded", ""
            return "Failed", ": ".join(x for x in (c.get("reason") or "Failed", c.get("message")) if x)
    return "Running", ""


def server_state(dep: Optional[dict]) -> str:
    """Absent|Ready|Stuck|Starting; Stuck once the Deployment's progress deadline passed."""
    if dep is None:
        return "Absent"
    status = dep.get("status") or {}
    if (status.get("readyReplicas") or 0) >= 1:
        return "Ready"
    for c in status.get("conditions") or []:
        if c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded":
            return "Stuck"
    return "Starting"


def desired_infra(exp: Experiment, st: Status) -> tuple[bool, bool]:
    """(server wanted, Ray wanted) for the runs still to go."""
    if st.phase in ("Queued", "Analyzing", *FINISHED):
        return False, False
    left = [family(r.baseline) for r in st.runs if r.state not in DONE]
    fams = set(left[:1] if exp.spec.cluster.gpu_placement == "phased" else left)
    return "djinn" in fams, "ray" in fams


def infra_actions(exp: Experiment, st: Status, obs: Observed) -> list[Action]:
    """Releases first (a GPU holder must go before the next one starts), then creations."""
    want_server, want_ray = desired_infra(exp, st)
    release: list[Action] = []
    create: list[Action] = []
    if exp.ray_name:
        if want_ray and obs.ray is None:
            create.append(Create(manifests.ray_cluster(exp)))
        elif obs.ray is not None and exp.spec.cluster.queue_name:  # Kueue owns spec.suspend
            if not want_ray:
                release.append(Delete("RayCluster", exp.ray_name))
        elif obs.ray is not None and raycluster.is_suspended(obs.ray) == want_ray:
            (create if want_ray else release).append(Suspend(exp.ray_name, not want_ray))
    if exp.server_name:
        if want_server and obs.auth_secret is None:
            create.append(Create(manifests.auth_secret(exp, obs.new_token)))
        if want_server and obs.service is None:
            create.append(Create(manifests.server_service(exp)))
        if want_server and obs.server is None:
            create.append(Create(manifests.server_deployment(exp)))
        elif not want_server and obs.server is not None:
            release.append(Delete("Deployment", exp.server_name))
    return release + create


def _time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def _age_s(stamp: str, now: str) -> float:
    return (_time(now) - _time(stamp)).total_seconds()


def _waited(st: Status, now: str) -> float:
    """Seconds since the current wait began (starting the clock on first call)."""
    st.waiting_since = st.waiting_since or now
    return _age_s(st.waiting_since, now)


def _infra_ready(exp: Experiment, fam: str, obs: Observed, st: Status, now: str) -> bool:
    """Whether the family's GPU holder is up; its readiness deadline fails the experiment.
    Under Kueue the wait for admission is Kueue's to bound, so no deadline applies."""
    c = exp.spec.cluster
    if fam == "ray" and exp.ray_name:
        if raycluster.is_ready(obs.ray):
            return True
        if _waited(st, now) > c.ray_ready_deadline_seconds and not c.queue_name:
            fail(st, "RayClusterNotReady", f"RayCluster {exp.ray_name} was not ready "
                 f"{c.ray_ready_deadline_seconds} s after the wait began (image pull, GPU capacity, KubeRay "
                 "operator?); raise spec.cluster.rayReadyDeadlineSeconds if it needs longer", now)
        return False
    if fam == "djinn" and exp.server_name:
        state = server_state(obs.server)
        if state == "Ready":
            return True
        if obs.server_crash:
            fail(st, "ServerNotReady", f"Djinn server {exp.server_name} keeps crashing: {obs.server_crash}", now)
            return False
        if state == "Stuck" or (_waited(st, now) > c.server_ready_deadline_seconds and not c.queue_name):
            fail(st, "ServerNotReady", f"Djinn server {exp.server_name} was not ready "
                 f"{c.server_ready_deadline_seconds} s after the wait began (image pull, GPU capacity, model "
                 "load? see its pod's log); raise spec.cluster.serverReadyDeadlineSeconds if it needs longer", now)
        return False
    return True


def _finish_run(exp: Experiment, st: Status, run: Run, obs: Observed, now: str) -> bool:
    """Fold the Running run's Job into the status; False while it is still going. A swept djinn_agents
    stops at its first failure of any kind, which then skips its larger N instead of failing the experiment."""
    outcome, reason = job_outcome(obs.job)
    if outcome in ("Missing", "Running"):
        return False
    swept = run.n is not None and run_plan.stops_at_first_failure(exp.spec, Baseline(run.baseline))
    if swept and (outcome == "Failed" or obs.result is None or obs.result.error or obs.result.oom):
        # the sweep's first failure of any kind (its pod killed, no document, one that records it) is its limit
        run.state = "OOM" if obs.result and obs.result.oom else "Failed"
        run.reason = None if run.state == "OOM" else "SweepLimit"
        run.result_key = obs.result.key if obs.result else None
        _skip_larger(st, run, f"djinnSweepCap: first failure at n={run.n}")
        return True
    if outcome == "Failed":
        run.state, run.reason = "Failed", reason.split(":")[0]
        said = (obs.result.error if obs.result and obs.result.error else None) or obs.job_message
        if obs.store:
            said = "; ".join(x for x in (said, f"results store: {obs.store.message}") if x)
        fail(st, "RunFailed", f"{run.label} (job {run.job}) failed: {reason}" + (f"; {said}" if said else ""), now)
    elif obs.result is None:
        run.state, run.reason = "Failed", "ResultMissing"
        fail(st, "ResultMissing", f"{run.label}: job {run.job} succeeded but wrote no valid result "
             f"under {st.results_uri}/results/{run.baseline}/", now)
    elif obs.result.error:
        run.state, run.reason, run.result_key = "Failed", "RunError", obs.result.key
        fail(st, "RunFailed", f"{run.label} (job {run.job}) failed: {obs.result.error}", now)
    else:
        run.result_key = obs.result.key
        run.state = "OOM" if obs.result.oom else "Succeeded"
        if obs.result.oom and exp.spec.stop_on_oom:
            _skip_larger(st, run, f"stopOnOom: OOM at n={run.n}")
    return True


def _skip_larger(st: Status, run: Run, why: str) -> None:
    for r in st.runs:
        if r.baseline == run.baseline and r.state == "Pending" and (r.n or 0) > (run.n or 0):
            r.state, r.reason = "Skipped", why


def _advance_runs(exp: Experiment, st: Status, obs: Observed, now: str) -> list[Action]:
    while (i := current(st)) is not None:
        run = st.runs[i]
        if run.state == "Running":
            if not _finish_run(exp, st, run, obs, now):
                st.phase = "Running"
                return [Create(manifests.run_job(exp, run.baseline, run.n))] if obs.job is None else []
            if st.phase == "Failed":
                return []
            obs = replace(obs, job=None, result=None)
            continue
        if not _infra_ready(exp, family(run.baseline), obs, st, now):
            if st.phase != "Failed":
                st.phase = "Provisioning"
            return []
        if not obs.foreign:
            st.waiting_since = None
        run.state, run.started_at, st.phase = "Running", now, "Running"
        return [Create(manifests.run_job(exp, run.baseline, run.n))]
    return _advance_analysis(exp, st, obs, now)


def _advance_analysis(exp: Experiment, st: Status, obs: Observed, now: str) -> list[Action]:
    a = st.analysis
    assert a is not None
    st.phase = "Analyzing"
    if a.state == "Pending":
        a.state = "Running"
        return [Create(manifests.analysis_job(exp))]
    outcome, reason = job_outcome(obs.analysis)
    if outcome == "Missing":
        return [Create(manifests.analysis_job(exp))]
    if outcome == "Succeeded":
        a.state, st.phase = "Succeeded", "Succeeded"
    elif outcome == "Failed":
        a.state, a.reason = "Failed", reason.split(":")[0]
        fail(st, "AnalysisFailed", f"analysis job {a.job} failed: {reason}", now)
    return []


def summarize(st: Status, now: str) -> None:
    """Progress, current run, and Ready / Progressing / Failed (+ Complete) agreeing with the phase."""
    done = sum(r.state in DONE for r in st.runs)
    st.progress = f"{done}/{len(st.runs)}" if st.runs else None
    i = current(st)
    live = st.phase not in FINISHED and i is not None
    st.current = Current(baseline=st.runs[i].baseline, n=st.runs[i].n) if live else None
    if st.phase in FINISHED:
        st.waiting_since = None
        set_condition(st, "Progressing", "False", st.phase, "", now)
    elif st.phase != "Queued":  # the queue writes its own message
        what = f"{st.runs[i].label} (job {st.runs[i].job})" if live else "analysis"
        set_condition(st, "Progressing", "True", st.phase, f"{st.phase}: {what}", now)
    failed = condition(st, "Failed")
    if st.phase != "Failed":
        set_condition(st, "Failed", "False", "NoFailure", "", now)
    if st.phase == "Succeeded":
        set_condition(st, "Ready", "True", "Succeeded", f"results and analysis under {st.results_uri}", now)
        set_condition(st, "Complete", "True", "Succeeded", f"results and analysis under {st.results_uri}", now)
    else:
        reason = failed.reason if st.phase == "Failed" and failed else st.phase
        set_condition(st, "Ready", "False", reason, "", now)


def _queue(exp: Experiment, st: Status, obs: Observed, now: str) -> bool:
    """Wait in phase Queued while another experiment holds (or is first in line for) the GPU pool."""
    if obs.turn is None or started(st):
        if condition(st, "Queued"):
            set_condition(st, "Queued", "False", "Admitted", f"GPU pool {pool(exp)} taken", now)
        return False
    st.phase = "Queued"
    message = f"waiting for GPU pool {pool(exp)}: held by {obs.turn.holder}; position {obs.turn.position}"
    set_condition(st, "Queued", "True", "WaitingForGPU", message, now)
    set_condition(st, "Progressing", "True", "Queued", message, now)
    return True


def _conflicts(exp: Experiment, st: Status, obs: Observed, now: str) -> None:
    """A child's name held by another owner: wait (condition ChildConflict) up to its deadline."""
    if not obs.foreign:
        if condition(st, "ChildConflict"):
            drop_condition(st, "ChildConflict")
            st.waiting_since = None  # that wait is over; the next one starts its own clock
        return
    limit = exp.spec.cluster.child_conflict_deadline_seconds
    message = (f"{', '.join(obs.foreign)} exists but belongs to another owner (a deleted experiment of the same "
               "name?); waiting for the garbage collector to delete it")
    set_condition(st, "ChildConflict", "True", "OwnedByAnother", message, now)
    if _waited(st, now) > limit:
        fail(st, "ChildConflict", f"{message}; still there after {limit} s: delete it or rename the experiment", now)


def _store_blocks(st: Status, obs: Observed, now: str) -> bool:
    """Whether the results store keeps the plan from going on. One that refused (no bucket, access denied)
    fails the experiment at once, as it will refuse again; one that does not answer is waited for
    (condition ResultStoreUnreachable) up to STORE_DEADLINE_S. A failed Job does not wait for it: its run
    fails on what its pod said."""
    i = current(st)
    running = st.runs[i] if i is not None and st.runs[i].state == "Running" else None
    if obs.store is None or (running and job_outcome(obs.job)[0] == "Failed"):
        drop_condition(st, "ResultStoreUnreachable")
        return False
    message = (f"results store {st.results_uri}: {obs.store.message}; check spec.output (uri, region, endpointUrl) "
               "and the operator's S3 access")
    if not obs.store.permanent:
        set_condition(st, "ResultStoreUnreachable", "True", "NoAnswer", message, now)
        since = condition(st, "ResultStoreUnreachable").last_transition_time  # type: ignore[union-attr]
        if _age_s(since, now) <= STORE_DEADLINE_S:
            return True
        message = f"{message}; no answer for {STORE_DEADLINE_S} s"
    if running:
        running.state, running.reason = "Failed", "ResultStoreError"
    fail(st, "ResultStoreError", message, now)
    return True


def advance(exp: Experiment, st: Status, obs: Observed, now: str) -> tuple[Status, list[Action]]:
    """One reconcile step: new status (to store first) and the actions to apply after it."""
    st = st.model_copy(deep=True)
    if st.phase in FINISHED:
        actions: list[Action] = []
    elif _queue(exp, st, obs, now):
        actions = []
    else:
        _conflicts(exp, st, obs, now)
        blocked = st.phase in FINISHED or _store_blocks(st, obs, now)
        actions = [] if blocked else _advance_runs(exp, st, obs, now)
    actions = infra_actions(exp, st, obs) + actions
    summarize(st, now)
    return st, [a for a in actions if a.target not in obs.foreign]


def rejected(st: Status, action: Action, message: str, now: str) -> Status:
    """The API server refused a child (422, 403...): say so; fail after MAX_CHILD_REJECTIONS in a row."""
    st = st.model_copy(deep=True)
    st.child_rejections += 1
    text = f"{action.target}: {message}"
    set_condition(st, "ChildRejected", "True", "Refused",
                  f"{text} (try {st.child_rejections} of {MAX_CHILD_REJECTIONS})", now)
    if st.child_rejections >= MAX_CHILD_REJECTIONS and st.phase not in FINISHED:
        for run in st.runs:
            if run.state == "Running" and action.target == f"Job/{run.job}":
                run.state, run.reason = "Failed", "ChildRejected"
        fail(st, "ChildRejected", f"the API server refused {text}", now)
        summarize(st, now)
    return st


def accepted(st: Status) -> Status:
    """Every action of the step went through: the refusal count starts over."""
    st = st.model_copy(deep=True)
    st.child_rejections = 0
    drop_condition(st, "ChildRejected")
    return st


_RUN_EVENTS = {"Running": ("Normal", "RunStarted", "started"), "Succeeded": ("Normal", "RunSucceeded", "succeeded"),
               "OOM": ("Normal", "RunOOM", "ran out of device memory"), "Skipped": ("Normal", "RunSkipped", "skipped"),
               "Failed": ("Warning", "RunFailed", "failed")}
_WARNING_CONDITIONS = ("ChildRejected", "ChildConflict", "SpecUpdateRefused", "ResultStoreUnreachable")


def events(old: Status, new: Status) -> list[Event]:
    """The Events a status change tells: each phase change, each run's start and end, each new problem."""
    out: list[Event] = []
    before = {r.job: r.state for r in old.runs}
    for r in new.runs:
        if r.state != before.get(r.job, "Pending") and r.state in _RUN_EVENTS:
            kind, reason, verb = _RUN_EVENTS[r.state]
            if r.reason == "SweepLimit":  # what a Djinn sweep looks for, not a problem to look at
                kind, reason, verb = "Normal", "SweepLimit", "found Djinn's limit: failed"
            detail = f" ({r.reason})" if r.reason else ""
            out.append(Event(kind, reason, f"{r.label} {verb}{detail} (job {r.job})"))
    for type_ in _WARNING_CONDITIONS:
        c, was = condition(new, type_), condition(old, type_)
        if c and c.status == "True" and (was is None or (was.status, was.message) != (c.status, c.message)):
            out.append(Event("Warning", type_, c.message))
    failed, told = condition(new, "Failed"), condition(old, "Failed") if old.phase == "Failed" else None
    if new.phase == "Failed" and (told is None or failed is None or told.message != failed.message):
        out.append(Event("Warning", failed.reason if failed else "Failed", failed.message if failed else ""))
    elif new.phase != old.phase:
        c = condition(new, "Progressing") if new.phase not in FINISHED else condition(new, "Ready")
        out.append(Event("Normal", new.phase, c.message if c else ""))
    return out
