"""The release half of the KFP components: the gate, the serving search and the deploy. Like
the rest (pipelines/components.py), thin wrappers whose bodies import and call a stage function.
"""

# Vertex AI's own artifact types, so that its console links a run to the model version and the
# endpoint it deployed. KFP adds this import to the component's executor command; the image has
# google-cloud-pipeline-components (pyproject.toml).
from google_cloud_pipeline_components.types.artifact_types import VertexEndpoint, VertexModel
from kfp.dsl import (
    HTML,
    Artifact,
    ClassificationMetrics,
    Dataset,
    Input,
    Markdown,
    Metrics,
    Model,
    Output,
)


def gate(
    onnx_models: Input[Model],
    results: Input[Artifact],
    test: Input[Dataset],
    max_accuracy_drop_pt: float,
    max_size_bytes: int,
    optimise: str,
    accuracy_floor: float,
    baseline_uri: str,
    reference_uri: str,
    latency_budget_p99_ms: float,
    target_concurrency: int,
    previous_results_uri: str,
    max_p99_regression_pct: float,
    deploy_target: str,
    local_repository: str,
    record: Output[Artifact],
    report_html: Output[HTML],
    chosen_model: Output[Model],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
) -> bool:
    """One record decides promotion: the chosen variant, its accuracy (against what serves now:
    `baseline_uri`, else the model the local repository serves, else the serving record kept at
    `reference_uri`; and against always guessing the majority class), parity and p99 on Triton. The chosen variant's confusion matrix on the test split
    goes to the UI's classification view."""
    import json

    from torchship.components.contracts import limit
    from torchship.components.gate.checks import gate_metrics
    from torchship.components.gate.stage import decide, write_reports
    from torchship.components.progress import report

    with open(results.path) as handle:
        summary = json.load(handle)
    decision = decide(
        onnx_models.path, summary, chosen_model.path,
        max_accuracy_drop_pt=max_accuracy_drop_pt, max_size_bytes=limit(max_size_bytes),
        optimise=optimise, accuracy_floor=accuracy_floor, baseline_uri=baseline_uri,
        reference_uri=reference_uri,
        latency_budget_p99_ms=limit(latency_budget_p99_ms),
        target_concurrency=target_concurrency,
        previous_results_uri=previous_results_uri,
        max_p99_regression_pct=max_p99_regression_pct, test_path=test.path,
        serving_repository=local_repository if deploy_target == "local" else "",
        progress=report,
    )
    write_reports(decision, summary, record.path, report_html.path)
    record.metadata.update({"passed": decision["passed"], "variant": decision["variant"],
                            "reason": decision["reason"]})
    metrics.log_metric("gate_passed", float(decision["passed"]))
    if decision["variant"] is not None:
        for key, value in gate_metrics(decision).items():
            metrics.log_metric(key, value)
        matrix = decision["confusion_matrix"]
        confusion.log_confusion_matrix(matrix["categories"], matrix["matrix"])
        confusion.metadata["variant"] = decision["variant"]
        confusion.metadata["test_accuracy"] = matrix["accuracy"]
    return bool(decision["passed"])


def tune_serving(
    onnx_models: Input[Model],
    gate_record: Input[Artifact],
    test: Input[Dataset],
    instance_counts: list[int],
    queue_delays_us: list[int],
    max_batch_sizes: list[int],
    optimise: str,
    latency_budget_p99_ms: float,
    target_concurrency: int,
    batch_size: int,
    duration_s: float,
    warmup_s: float,
    window_s: float,
    min_windows: int,
    max_windows: int,
    stability_pct: float,
    engine: str,
    throughput_target_rps: float,
    serving_backend: str,
    record: Output[Artifact],
    chosen_model: Output[Model],
    report_html: Output[HTML],
    metrics: Output[Metrics],
    table: Output[Markdown],
):
    """One search over the variants the gate found eligible x Triton settings (instance_count x
    max_queue_delay_us x max_batch_size) on one local tritonserver, by successive halving at the
    target concurrency under the gate's p99 budget (and `throughput_target_rps`, 0: none); the
    record names the variant and settings to deploy with, `chosen_model` holds that variant as
    the gate's `chosen_model` does. `serving_backend` as the benchmark's."""
    from torchship.components.contracts import limit
    from torchship.components.progress import report
    from torchship.components.triton.binary import find_tritonserver, measurement_backend
    from torchship.components.tune_serving.choice import serving_metrics, write_candidate_table
    from torchship.components.tune_serving.stage import search_serving_config

    backend = measurement_backend(serving_backend)
    report(f"searching on {find_tritonserver().describe()} with Triton's {backend} backend")

    searched = search_serving_config(
        onnx_models.path, test.path, record.path, gate_record=gate_record.path,
        chosen_dir=chosen_model.path, report_path=report_html.path,
        instance_counts=[int(c) for c in instance_counts],
        queue_delays_us=[int(d) for d in queue_delays_us],
        max_batch_sizes=[int(b) for b in max_batch_sizes],
        target_concurrency=target_concurrency, latency_budget_p99_ms=limit(latency_budget_p99_ms),
        throughput_target_rps=limit(throughput_target_rps), backend=backend,
        optimise=optimise, batch_size=batch_size, duration_s=duration_s, warmup_s=warmup_s,
        window_s=window_s, min_windows=min_windows, max_windows=max_windows,
        stability_pct=stability_pct, engine=engine, progress=report,
    )
    write_candidate_table(searched, table.path)
    record.metadata.update({"chosen": searched["chosen"], "variant": searched["variant"],
                            "settings": searched["settings"], "reason": searched["reason"],
                            "tied": searched["tied"]})
    chosen_model.metadata["variant"] = searched["variant"]
    for key, value in serving_metrics(searched).items():
        metrics.log_metric(key, value)


def deploy(
    chosen_model: Input[Model],
    test: Input[Dataset],
    serving_record: Input[Artifact],
    statistics: Input[Artifact],
    gate_record: Input[Artifact],
    target: str,
    local_repository: str,
    settings: dict,
    reference_uri: str,
    serving_model_name: str,
    model_repository: Output[Artifact],
    vertex_model: Output[VertexModel],
    vertex_endpoint: Output[VertexEndpoint],
):
    """Deploy the chosen model with the serving search's settings as a new version of
    `serving_model_name` (whichever variant it is) on Triton (local), a Vertex AI Endpoint or
    KServe, smoke-tested against ONNX Runtime; on failure the serving version stays as it was.
    Then keep the retraining reference at `reference_uri`.

    `vertex_model` and `vertex_endpoint` name the Model Registry version and the Endpoint a
    vertex deploy made, as Google Cloud Pipeline Components' ops do (metadata `resourceName`, the
    resource's REST URL as URI); for another target they stay empty but for `target`."""
    import json

    from torchship.components.deploy.stage import deploy_to
    from torchship.components.progress import report

    with open(serving_record.path) as handle:
        searched = json.load(handle)
    serving = searched["settings"]
    result = deploy_to(target, chosen_model.path, model_repository.path, model_repository.uri,
                       test.path, local_repository=local_repository, settings=settings,
                       serving=serving, model_name=serving_model_name, progress=report)
    model_repository.metadata.update({"target": target, "serving": serving,
                                      "model_name": serving_model_name,
                                      "variant": result["variant"],
                                      **result.get("summary", {})})
    for artifact in (vertex_model, vertex_endpoint):
        artifact.metadata["target"] = target
    if target == "vertex":
        from torchship.components.deploy.targets.vertex import resource_uri

        for artifact, name in ((vertex_model, result["model_version_name"]),
                               (vertex_endpoint, result["endpoint"])):
            artifact.uri = resource_uri(name)
            artifact.metadata["resourceName"] = name
    if reference_uri:
        from torchship.components.deploy.reference import keep_reference

        chosen = next((c for c in searched.get("candidates", [])
                       if c["model"] == searched.get("chosen")), None)
        measured = [level["p99_ms"] for level in (chosen or {}).get("levels", {}).values()]
        kept = keep_reference(reference_uri, statistics.path, gate_record.path, target,
                              {**result, **({"p99_ms": measured[0]} if measured else {})})
        report(f"reference: {kept['model']} version {kept['version']} ({kept['variant']}) and "
               f"its training statistics kept in {reference_uri}")
