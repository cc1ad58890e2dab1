"""A local stand-in for Vertex AI's REST API that records what the real SDK sends it.

The one allowed stand-in: Google's servers. Point the real `google-cloud-aiplatform` SDK at it
with `aiplatform.init(api_endpoint=fake.endpoint, api_transport="rest", ...)`. It keeps the
resources it was asked to create, so `get`, `list`, `pause` and `delete` answer consistently.

Model Registry and Endpoints: `upload` adds versions under a parent model (aliases move between
versions as on Vertex AI), `deployModel` / `undeployModel` keep the endpoint's traffic split, and
`:rawPredict` picks a deployed model by that split (smooth weighted round robin, so a 10% canary
answers every tenth request) and names it in `X-Vertex-AI-Deployed-Model-Id`. What the deployed
model answers is the test's to say: set `raw_predict` (the fake runs no models).

Pipeline jobs: each GET moves a job along `pipeline_states` (create, start and end times set as
it goes), `:cancel` makes it CANCELLED for good, and a list answers newest last (the SDK orders
it) filtered by `pipeline_name="..."`. Once running, a job has its `system.PipelineRun` context
in the metadata store (`jobDetail.pipelineRunContext`), as Vertex AI makes one; Vertex AI
Experiments are contexts too (`system.Experiment`), and `:addContextChildren` puts a run's
context under an experiment's (the child's `parentContexts`), which is how the SDK associates a
job with an experiment.
"""

import hashlib
import itertools
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from typing_extensions import Self

# Custom methods whose long-running operation completes with the resource itself.
_OPERATION_TYPES = {
    "upload": "google.cloud.aiplatform.v1.UploadModelResponse",
    "deployModel": "google.cloud.aiplatform.v1.DeployModelResponse",
    "undeployModel": "google.cloud.aiplatform.v1.UndeployModelResponse",
}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: dict[str, Any]
    headers: dict[str, str]

    def header(self, name: str) -> str | None:
        """A header's value, its name in any case (as HTTP has it)."""
        return next((value for key, value in self.headers.items()
                     if key.lower() == name.lower()), None)


class LocalServer:
    """A recording HTTP server on 127.0.0.1 (a `with` block starts and stops it): every request is
    answered by the subclass's `_answer(request)`, which keeps it in `requests`; an answer is
    (status, JSON body or text[, extra headers])."""

    requests: list[Request]
    _server: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start the fake first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Self:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                url = urlparse(self.path)
                is_json = "json" in (self.headers.get("Content-Type") or "json")
                body = (json.loads(raw) if is_json else {"raw": raw.decode("latin-1")}) if raw else {}
                request = Request(self.command, unquote(url.path), parse_qs(url.query), body,
                                  dict(self.headers))
                status, payload, *extra = fake._answer(request)
                text = isinstance(payload, str)
                data = (payload if text else json.dumps(payload)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if text else "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (extra[0] if extra else {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def calls(self, method: str, pattern: str) -> list[Request]:
        """Recorded requests with this method whose path matches `pattern` (re.search)."""
        return [r for r in self.requests if r.method == method and re.search(pattern, r.path)]


@dataclass
class FakeVertex(LocalServer):
    """Serve on 127.0.0.1; `requests` lists every call, `resources` what now exists."""

    # States a pipeline job walks through on successive GETs; the last one sticks.
    pipeline_states: list[str] = field(
        default_factory=lambda: ["PIPELINE_STATE_RUNNING", "PIPELINE_STATE_SUCCEEDED"])
    requests: list[Request] = field(default_factory=list)
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Paths (regular expressions) that answer with this HTTP status instead, e.g. to fail a deploy.
    failures: dict[str, int] = field(default_factory=dict)
    # What a deployed model answers to `:rawPredict`: (request, endpoint, deployed model) ->
    # (HTTP status, JSON body). Unset: 501.
    raw_predict: Callable[[Request, dict[str, Any], dict[str, Any]],
                          tuple[int, dict[str, Any]]] | None = None

    def __post_init__(self) -> None:
        self._ids = itertools.count(1)
        self._gets: dict[str, int] = {}
        self._lock = threading.Lock()
        self._credit: dict[str, dict[str, int]] = {}  # rawPredict routing state per endpoint
        self._clock = itertools.count(1)
        self._cancelled: set[str] = set()

    # -- what the API answers -------------------------------------------------------------------

    def _answer(self, request: Request) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.requests.append(request)
            for pattern, status in self.failures.items():
                if re.search(pattern, request.path):
                    return status, {"error": {"code": status, "message": "injected failure",
                                              "status": "FAILED_PRECONDITION"}}
            if "raw" in request.body and request.method == "POST":
                return 200, self._template_upload(request)
            path = request.path.removeprefix("/v1/").removeprefix("/v1beta1/")
            name, _, verb = path.partition(":")
            if verb:
                return self._custom(request, name, verb)
            if request.method == "POST":
                return self._create(request, name)
            if request.method == "GET":
                return self._get(name, request.query)
            if request.method == "PATCH":
                self.resources.setdefault(name, {"name": name}).update(request.body)
                return 200, self.resources[name]
            if request.method == "DELETE":
                self.resources.pop(name, None)
                return 200, self._operation(name, {}, "")
            return 405, {"error": {"code": 405, "message": "method not allowed"}}

    def _template_upload(self, request: Request) -> str:
        """Artifact Registry's KFP repository: answers `PACKAGE/VERSION` for an uploaded YAML."""
        raw = request.body["raw"]
        package = re.search(r"^pipelineInfo:\n(?:  .*\n)*?  name: (\S+)", raw, re.MULTILINE).group(1)
        version = "sha256:" + hashlib.sha256(raw.encode("latin-1")).hexdigest()
        tags = re.search(r'name="tags"\r?\n\r?\n([^\r\n]*)', raw)
        self.resources[f"{request.path}/{package}/{version}"] = {
            "package": package, "version": version,
            "tags": tags.group(1).split(",") if tags else [], "content": raw}
        return f"{package}/{version}"

    def _create(self, request: Request, collection: str) -> tuple[int, dict[str, Any]]:
        kind = collection.rsplit("/", 1)[-1]
        given = {"pipelineJobs": "pipelineJobId", "schedules": "scheduleId",
                 "contexts": "contextId"}.get(kind)
        resource_id = (request.query.get(given) or [str(next(self._ids))])[0] if given else str(
            next(self._ids))
        resource = {**request.body, "name": f"{collection}/{resource_id}"}
        if resource["name"] in self.resources:  # as Vertex AI answers a reused job ID
            return 409, {"error": {"code": 409, "status": "ALREADY_EXISTS",
                                   "message": f"{resource['name']} already exists"}}
        if kind == "pipelineJobs":
            resource.update(state="PIPELINE_STATE_PENDING", createTime=self._now())
        if kind == "schedules":
            resource["state"] = "ACTIVE"
        self.resources[resource["name"]] = resource
        if kind in ("pipelineJobs", "schedules", "contexts"):
            return 200, resource
        return 200, self._operation(resource["name"], resource, kind)

    def _get(self, name: str, query: dict[str, list[str]] | None = None
             ) -> tuple[int, dict[str, Any]]:
        if name in self.resources:
            resource = self.resources[name]
            if "/pipelineJobs/" in name and name not in self._cancelled:
                seen = self._gets[name] = self._gets.get(name, -1) + 1
                self._walk(resource, self.pipeline_states[min(seen, len(self.pipeline_states) - 1)])
            return 200, resource
        if "/operations/" in name:
            return 200, {"name": name, "done": True}
        if name.endswith("/metadataStores/default"):  # every location has its default store
            return 200, {"name": name}
        collection = [r for key, r in self.resources.items()
                      if key.rsplit("/", 1)[0] == name and "@" not in key]  # not model versions
        kind = name.rsplit("/", 1)[-1]
        wanted = re.fullmatch(r'display_name="([^"]*)"', ((query or {}).get("filter") or [""])[0])
        if kind in ("models", "endpoints") and wanted:
            collection = [r for r in collection if r.get("displayName") == wanted.group(1)]
        pipeline = re.fullmatch(r'pipeline_name="([^"]*)"',
                                ((query or {}).get("filter") or [""])[0])
        if kind == "pipelineJobs" and pipeline:
            collection = [r for r in collection if r.get("pipelineSpec", {}).get(
                "pipelineInfo", {}).get("name") == pipeline.group(1)]
        if re.fullmatch(r"[a-zA-Z]+", kind) and len(name.split("/")) % 2:  # a collection
            return 200, {kind: collection}
        return 404, {"error": {"code": 404, "message": f"{name} not found", "status": "NOT_FOUND"}}

    def _custom(self, request: Request, name: str, verb: str) -> tuple[int, dict[str, Any]]:
        if verb in ("pause", "resume"):
            self.resources[name]["state"] = "PAUSED" if verb == "pause" else "ACTIVE"
            return 200, {}
        if verb == "cancel":
            if "/pipelineJobs/" in name:
                self._cancelled.add(name)
                self._walk(self.resources[name], "PIPELINE_STATE_CANCELLED")
            return 200, {}
        if verb == "addContextChildren":
            for child in request.body.get("childContexts", []):
                parents = self.resources[child].setdefault("parentContexts", [])
                parents.append(name)
            return 200, {}
        if verb == "upload":
            model_id = request.body.get("modelId") or str(next(self._ids))
            parent = request.body.get("parentModel")
            model_name = parent or f"{name}/{model_id}"
            versions = [key for key in self.resources if key.startswith(f"{model_name}@")]
            version = str(len(versions) + 1)
            model = {**request.body.get("model", {}), "name": model_name, "versionId": version,
                     # Custom-container models deploy on dedicated machines.
                     "supportedDeploymentResourcesTypes": ["DEDICATED_RESOURCES"]}
            if not versions:  # the first version is the default whatever was asked
                model["versionAliases"] = sorted({*model.get("versionAliases", []), "default"})
            self._move_aliases(model_name, version, model.get("versionAliases", []))
            self.resources[f"{model_name}@{version}"] = model
            if not versions or "default" in model.get("versionAliases", []):
                self.resources[model_name] = model  # the model's name means its default version
            return 200, self._operation(model_name, {"model": model_name,
                                                     "modelVersionId": version}, verb)
        if verb == "mergeVersionAliases":
            model = self.resources[name]
            changes = request.body.get("versionAliases", [])
            aliases = set(model.get("versionAliases", []))
            aliases -= {a[1:] for a in changes if a.startswith("-")}
            added = [a for a in changes if not a.startswith("-")]
            model["versionAliases"] = sorted(aliases | set(added))
            base, _, version = name.partition("@")
            self._move_aliases(base, version, added)
            if "default" in added:
                self.resources[base] = model
            return 200, model
        if verb == "rawPredict":
            return self._raw_predict(request, name)
        if verb in ("deployModel", "undeployModel"):
            endpoint = self.resources.setdefault(name, {"name": name})
            if verb == "deployModel":
                deployed = {**request.body.get("deployedModel", {}), "id": str(next(self._ids))}
                endpoint.setdefault("deployedModels", []).append(deployed)
                split = request.body.get("trafficSplit") or {deployed["id"]: 100}
                # "0" in a request's split stands for the model being deployed.
                endpoint["trafficSplit"] = {deployed["id"] if k == "0" else k: v
                                            for k, v in split.items()}
                return 200, self._operation(name, {"deployedModel": deployed}, verb)
            gone = request.body.get("deployedModelId")
            endpoint["deployedModels"] = [d for d in endpoint.get("deployedModels", [])
                                          if d["id"] != gone]
            if "trafficSplit" in request.body:
                endpoint["trafficSplit"] = request.body["trafficSplit"]
            else:
                endpoint["trafficSplit"] = {k: v for k, v in endpoint.get("trafficSplit", {}).items()
                                            if k != gone}
            return 200, self._operation(name, {}, verb)
        return 400, {"error": {"code": 400, "message": f"unknown method :{verb}"}}

    def _walk(self, job: dict[str, Any], state: str) -> None:
        """Move a pipeline job to `state`: started once it runs, with its run context in the
        metadata store; ended once it is done."""
        job["state"] = state
        if state != "PIPELINE_STATE_PENDING" and "startTime" not in job:
            job["startTime"] = self._now()
            store = job["name"].split("/pipelineJobs/")[0] + "/metadataStores/default"
            run_context = f"{store}/contexts/{job['name'].rsplit('/', 1)[-1]}"
            self.resources[run_context] = {"name": run_context, "displayName": job["name"],
                                           "schemaTitle": "system.PipelineRun"}
            job["jobDetail"] = {"pipelineRunContext": self.resources[run_context]}
        done = ("SUCCEEDED", "FAILED", "CANCELLED")
        if state.removeprefix("PIPELINE_STATE_") in done and "endTime" not in job:
            job["endTime"] = self._now()

    def _now(self) -> str:
        """Times one second apart, in the order asked."""
        moment = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=next(self._clock))
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")

    def _move_aliases(self, model_name: str, version: str, aliases: list[str]) -> None:
        """An alias names one version at a time: giving it to `version` takes it off the others."""
        for key, other in self.resources.items():
            if key.startswith(f"{model_name}@") and key != f"{model_name}@{version}":
                other["versionAliases"] = [a for a in other.get("versionAliases", [])
                                           if a not in aliases]

    def _raw_predict(self, request: Request, name: str
                     ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Route by the traffic split (smooth weighted round robin) to a deployed model."""
        endpoint = self.resources.get(name)
        split = {k: int(v) for k, v in (endpoint or {}).get("trafficSplit", {}).items() if int(v)}
        if not split:
            return 400, {"error": {"code": 400, "status": "FAILED_PRECONDITION",
                                   "message": f"{name} has no deployed model with traffic"}}, {}
        credit = self._credit.setdefault(name, {})
        for key, weight in split.items():
            credit[key] = credit.get(key, 0) + weight
        chosen = max(split, key=lambda key: credit[key])
        credit[chosen] -= sum(split.values())
        deployed = next(d for d in endpoint["deployedModels"] if d["id"] == chosen)
        headers = {"X-Vertex-AI-Deployed-Model-Id": chosen,
                   "X-Vertex-AI-Model": deployed.get("model", "").partition("@")[0]}
        if self.raw_predict is None:
            return 501, {"error": {"code": 501, "message": "no raw_predict answer set"}}, headers
        status, body = self.raw_predict(request, endpoint, deployed)
        return status, body, headers

    def _operation(self, name: str, response: dict[str, Any], kind: str) -> dict[str, Any]:
        """A finished long-running operation whose response is typed by the method or resource."""
        type_name = _OPERATION_TYPES.get(kind) or (
            f"google.cloud.aiplatform.v1.{kind[0].upper()}{kind[1:-1]}" if kind
            else "google.protobuf.Empty")
        return {"name": f"{name}/operations/{next(self._ids)}", "done": True,
                "response": {"@type": f"type.googleapis.com/{type_name}", **response}}
