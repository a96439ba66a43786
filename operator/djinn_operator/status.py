"""The custom resource's status as typed models (the CRD's status schema is generated from them)."""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

Phase = Literal["Pending", "Queued", "Provisioning", "Running", "Analyzing", "Succeeded", "Failed"]
RunState = Literal["Pending", "Running", "Succeeded", "Failed", "OOM", "Skipped"]
JobState = Literal["Pending", "Running", "Succeeded", "Failed"]


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Condition(_Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str
    observed_generation: Optional[int] = None


class Run(_Model):
    baseline: str
    n: Optional[int] = None
    job: str
    state: RunState = "Pending"
    result_key: Optional[str] = None
    reason: Optional[str] = None
    started_at: Optional[str] = None

    @property
    def label(self) -> str:
        return self.baseline if self.n is None else f"{self.baseline} n={self.n}"


class Analysis(_Model):
    job: str
    state: JobState = "Pending"
    reason: Optional[str] = None


class Current(_Model):
    baseline: str
    n: Optional[int] = None


class Children(_Model):
    server: Optional[str] = None
    ray: Optional[str] = None


class Status(_Model):
    observed_generation: Optional[int] = Field(None, description="metadata.generation this status was computed from")
    phase: Phase = "Pending"
    progress: Optional[str] = None
    current: Optional[Current] = None
    results_uri: Optional[str] = None
    weights: Optional[str] = Field(None, description="Which weights the pods load (auto resolved at planning)")
    runs: list[Run] = Field(default_factory=list)
    analysis: Optional[Analysis] = None
    children: Optional[Children] = None
    waiting_since: Optional[str] = Field(None, description="When the current wait on a child began (its deadline "
                                                           "counts from here)")
    child_rejections: int = Field(0, description="Consecutive writes of a child the API server refused")
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra={
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
    spec_hash: Optional[str] = None
    planned_spec: Optional[str] = Field(None, description="The spec the plan was made from (JSON)")

    def to_dict(self) -> dict[str, Any]:
        """Status as stored; absent fields map to null so a merge patch removes stale keys."""
        out = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return {**{f.alias: None for f in type(self).model_fields.values()}, **out}


def set_condition(st: Status, type_: str, status: str, reason: str, message: str, now: str) -> None:
    """Add or update one condition; its lastTransitionTime moves only when its status flips."""
    old = next((c for c in st.conditions if c.type == type_), None)
    if old and (old.status, old.reason, old.message) == (status, reason, message):
        return
    ltt = old.last_transition_time if old and old.status == status else now
    new = Condition(type=type_, status=status, reason=reason, message=message, last_transition_time=ltt)
    st.conditions = [new if c.type == type_ else c for c in st.conditions] if old else [*st.conditions, new]


def drop_condition(st: Status, type_: str) -> None:
    st.conditions = [c for c in st.conditions if c.type != type_]


def condition(st: Status, type_: str) -> Optional[Condition]:
    return next((c for c in st.conditions if c.type == type_), None)


def observe_generation(st: Status, generation: Optional[int]) -> None:
    """Every condition is re-derived from the current spec each reconcile, so all carry its generation."""
    st.observed_generation = generation
    for c in st.conditions:
        c.observed_generation = generation
