"""A local stand-in for the Kubeflow Pipelines API server (v2beta1 REST) that records what the real
kfp SDK sends it.

There is no Kubernetes cluster here, so this stands for the KFP API server (ml-pipeline) alone:
the client is the real `kfp.Client(host=fake.endpoint)` with its generated `kfp_server_api`
client, which deserialises the JSON answered here as it would the server's. It answers the calls
`kfp.Client` makes for runs and recurring runs from a pipeline package:

  GET  /apis/v2beta1/healthz                    the client asks on start (multi_user: false)
  POST /apis/v2beta1/experiments                create_experiment, after it looked the name up
  GET  /apis/v2beta1/experiments[/ID]           get_experiment / list_experiments (filter)
  POST /apis/v2beta1/runs                       run_pipeline, create_run_from_pipeline_package
  GET  /apis/v2beta1/runs[/ID]                  list_runs (filter, experiment_id) / get_run
  POST /apis/v2beta1/runs/ID:terminate          terminate_run (the run becomes CANCELING)
  POST /apis/v2beta1/recurringruns              create_recurring_run
  GET  /apis/v2beta1/recurringruns[/ID]         list_recurring_runs / get_recurring_run
  POST /apis/v2beta1/recurringruns/ID:disable   disable_recurring_run (status DISABLED)
  POST /apis/v2beta1/recurringruns/ID:enable    enable_recurring_run (status ENABLED)
  DELETE /apis/v2beta1/recurringruns/ID         delete_recurring_run

With `multi_user`, as the server of a multi-user cluster: an experiment needs a namespace, and a
list needs a namespace or an experiment (whose namespace runs and recurring runs belong to).
With `token`, every call must carry `Authorization: Bearer <token>` (else 401).

A list's `filter` is the JSON Filter message (predicates with key, operation and a value); the
client sends the operation as a number (get_experiment: 1) or a name ("EQUALS"), as the server's
protojson accepts both; EQUALS, NOT_EQUALS and IS_SUBSTRING on string values are understood,
anything else is refused with 400 so a test notices. Nothing runs: a run stays PENDING. Pipeline
upload (pipelines/upload, multipart) is not served: submit and schedule send the pipeline spec in
the run itself. A cron of other than six fields (seconds first) is refused, as the scheduled
workflow's parser would not take it.
"""

from __future__ import annotations

import itertools
import json
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from fake_vertex import LocalServer, Request

API = "/apis/v2beta1"
# filter.proto's Predicate.Operation, by number and name.
OPERATIONS = {1: "EQUALS", 2: "NOT_EQUALS", 9: "IS_SUBSTRING"}


@dataclass
class FakeKFP(LocalServer):
    """Serve on 127.0.0.1; `requests` lists every call; `experiments`, `runs` and
    `recurring_runs` hold what was created, by ID."""

    multi_user: bool = False
    token: str | None = None
    requests: list[Request] = field(default_factory=list)
    experiments: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    recurring_runs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._clock = itertools.count(1)
        self._lock = threading.Lock()

    # -- what the API answers -------------------------------------------------------------------

    def _answer(self, request: Request) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.requests.append(request)
            path = request.path.removeprefix(API)
            if path == request.path:
                return _error(404, f"no API at {request.path}")
            collection, _, name = path.strip("/").partition("/")
            if collection == "healthz" and request.method == "GET":
                return 200, {"multi_user": self.multi_user, "pipeline_store": "database"}
            if self.token and request.header("Authorization") != f"Bearer {self.token}":
                return _error(401, "Unauthenticated: no valid bearer token")
            kinds = {"experiments": (self.experiments, "experiment_id", "experiments"),
                     "runs": (self.runs, "run_id", "runs"),
                     "recurringruns": (self.recurring_runs, "recurring_run_id",
                                       "recurringRuns")}
            if collection not in kinds:
                return _error(404, f"{request.path} is not served by this fake")
            store, id_key, list_key = kinds[collection]
            name, _, verb = name.partition(":")
            if name:
                if name not in store:
                    return _error(404, f"{collection[:-1]} {name} not found")
                return self._change(collection, store, name, verb, request.method)
            if request.method == "POST":
                return self._create(collection, store, id_key, request.body)
            if request.method == "GET":
                return self._list(store, list_key, request.query)
            return _error(405, f"{request.method} {request.path}")

    def _change(self, collection: str, store: dict[str, dict[str, Any]], name: str, verb: str,
                method: str) -> tuple[int, dict[str, Any]]:
        """GET one resource, or what a custom verb or DELETE does to it."""
        if method == "GET" and not verb:
            return 200, store[name]
        if method == "DELETE" and not verb and collection == "recurringruns":
            del store[name]
            return 200, {}
        if method == "POST" and (collection, verb) == ("runs", "terminate"):
            store[name]["state"] = "CANCELING"
            return 200, {}
        if method == "POST" and collection == "recurringruns" and verb in ("enable", "disable"):
            store[name]["status"] = f"{verb.upper()}D"
            return 200, {}
        return _error(405, f"{method} {collection}/{name}{':' + verb if verb else ''}")

    def _create(self, collection: str, store: dict[str, dict[str, Any]], id_key: str,
                body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if not body.get("display_name"):
            return _error(400, "display_name is required")
        if collection == "experiments" and self.multi_user and not body.get("namespace"):
            return _error(400, "in multi-user mode an experiment needs a namespace")
        if collection != "experiments":
            if not (body.get("pipeline_spec") or body.get("pipeline_version_reference")):
                return _error(400, "a pipeline_spec or a pipeline_version_reference is required")
            if body.get("experiment_id") and body["experiment_id"] not in self.experiments:
                return _error(404, f"experiment {body['experiment_id']} not found")
        if collection == "recurringruns":
            cron = (body.get("trigger") or {}).get("cron_schedule", {}).get("cron")
            interval = (body.get("trigger") or {}).get("periodic_schedule", {})
            if not cron and not interval:
                return _error(400, "a trigger (cron_schedule or periodic_schedule) is required")
            if cron and len(cron.split()) != 6:
                return _error(400, f"cron {cron!r}: six fields, seconds first")
        resource = {**body, id_key: str(uuid.uuid4()), "created_at": self._now()}
        if collection == "experiments":
            resource["storage_state"] = "AVAILABLE"
        elif collection == "runs":
            resource.update(state="PENDING", storage_state="AVAILABLE")
        else:
            resource["status"] = "ENABLED" if body.get("mode") != "DISABLE" else "DISABLED"
        store[resource[id_key]] = resource
        return 200, resource

    def _list(self, store: dict[str, dict[str, Any]], list_key: str,
              query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        found = list(store.values())
        experiment, namespace = ((query.get(key) or [""])[0] for key in ("experiment_id",
                                                                          "namespace"))
        if self.multi_user and not (experiment or namespace):
            return _error(400, "in multi-user mode, list by namespace or experiment")
        if experiment:
            found = [r for r in found if r.get("experiment_id") == experiment]
        if namespace:  # runs and recurring runs are in their experiment's namespace
            found = [r for r in found if (r.get("namespace") or self.experiments.get(
                r.get("experiment_id"), {}).get("namespace")) == namespace]
        if query.get("filter") and query["filter"][0]:
            try:
                found = [r for r in found if _matches(r, json.loads(query["filter"][0]))]
            except ValueError as exc:
                return _error(400, f"filter: {exc}")
        sort_by = (query.get("sort_by") or [""])[0].split()
        if sort_by:
            found.sort(key=lambda r: str(r.get(sort_by[0], "")), reverse=sort_by[-1] == "desc")
        start = int((query.get("page_token") or ["0"])[0] or 0)
        size = int((query.get("page_size") or ["0"])[0] or 0) or len(found) or 1
        page = found[start:start + size]
        answer: dict[str, Any] = {"total_size": len(found)}
        if page:
            answer[list_key] = page
        if start + size < len(found):
            answer["next_page_token"] = str(start + size)
        return 200, answer

    def _now(self) -> str:
        """Creation times one second apart, in order."""
        moment = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=next(self._clock))
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _matches(resource: dict[str, Any], filter_: dict[str, Any]) -> bool:
    for predicate in filter_.get("predicates", []):
        operation = predicate.get("operation")
        operation = OPERATIONS.get(operation, operation)
        value = predicate.get("stringValue", predicate.get("string_value"))
        if operation not in OPERATIONS.values() or value is None:
            raise ValueError(f"predicate {predicate} is not understood by this fake")
        actual = str(resource.get(predicate["key"], ""))
        if not {"EQUALS": actual == value, "NOT_EQUALS": actual != value,
                "IS_SUBSTRING": value in actual}[operation]:
            return False
    return True


def _error(status: int, message: str) -> tuple[int, dict[str, Any]]:
    return status, {"error": message, "code": status, "message": message}
