"""The report's first screen: what was optimised under which constraints, what was chosen with
which serving settings, why each other variant lost, and where it was measured.

It reads only records: the gate record's ``choice`` (``gate.choice.choose_variant``: the table
with each row's ``outcome`` and ``margin``), its ``settings``, ``environment`` (what the gate
knows of how the benchmark served) and the benchmark result (``host``, each row's ``client``,
and ``server``: the Triton version, binary and each model's config as the running server
reported them, ``benchmark.served``). What the benchmark's ``server`` block holds wins over
what the gate knows; a result written before it was recorded falls back to the gate's.
Units: latency in ms, throughput in req/s, sizes in KiB. A field no record holds is shown as
``not recorded``, never guessed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["candidate_rows", "chosen_line", "constraint_lines", "environment_rows",
           "objective_line", "target_level"]

NOT_RECORDED = "not recorded"
# What the variant table's metrics measure, for the objective's sentence.
_METRICS = {
    "onnx_size_bytes": "ONNX file size", "compressed_size_bytes": "gzip-compressed size",
    "onnx_test_accuracy": "test accuracy (ONNX)", "test_accuracy": "test accuracy",
    "n_parameters": "parameter count", "acc_drop_pt": "accuracy drop (pt)",
}


def _metric_text(metric: str) -> str:
    if metric.startswith("latency_b") and metric.endswith("_ms"):
        return (f"{metric}: ONNX Runtime latency at batch {metric[9:-3]}, one thread, in "
                "process (ms)")
    return f"{metric}: {_METRICS.get(metric, metric)}"


def target_level(gate: dict[str, Any]) -> int | None:
    target = (gate.get("settings") or {}).get("target_concurrency")
    return None if target is None else int(target)


def objective_line(gate: dict[str, Any]) -> str:
    choice = gate.get("choice") or {}
    if not choice:
        return "Objective: not recorded"
    word = "highest" if choice.get("direction") == "max" else "lowest"
    text = (f"Objective: the {word} {_metric_text(choice['optimise'])}, among the variants "
            "meeting every constraint")
    target = target_level(gate)
    if target is not None:
        text += f"; the chosen one is then checked on Triton at concurrency {target}"
    return text + "."


def constraint_lines(gate: dict[str, Any]) -> list[str]:
    """The choice's constraints, then the gate's, each with its limit or that it was not set."""
    choice, settings = gate.get("choice") or {}, gate.get("settings") or {}
    lines = []
    for key, spec in (choice.get("constraints") or {}).items():
        limit = spec["limit"]
        shown = (f"{limit:g} pt" if key == "accuracy" else f"{limit / 1024:.1f} KiB"
                 if spec["metric"].endswith("_bytes") else f"{limit:g} ms"
                 if spec["metric"].endswith("_ms") else f"{limit:g}")
        name = "accuracy drop from fp32" if key == "accuracy" else spec["metric"]
        lines.append(f"{name} <= {shown}")
    if choice and not choice.get("constraints"):
        lines.append("no constraint on the variant (accuracy drop, size) was set")
    budget, target = settings.get("latency_budget_p99_ms"), settings.get("target_concurrency")
    lines.append(f"p99 <= {budget:g} ms at concurrency {target}" if budget
                 else "p99: no budget given (latency_budget_p99_ms), so not checked")
    bars = [c.get("bar") for c in gate.get("checks", []) if c.get("bar")]
    if bars:
        bar = bars[0]
        rate = bar.get("majority_rate")
        lines.append(f"first-run accuracy (no serving baseline) above {bar['threshold']:.4f}: "
                     f"the {bar['applied']}, the larger of accuracy_floor "
                     f"{bar['accuracy_floor']:g} and the test split's majority-class rate "
                     + ("(not known: no test labels)" if rate is None else f"{rate:.4f}"))
    elif (gate.get("baseline") or {}).get("source"):
        drop = settings.get("max_accuracy_drop_pt")
        lines.append(f"accuracy within {drop:g} pt of the serving baseline "
                     f"({gate['baseline']['source']})")
    errors = settings.get("max_errors")
    if errors is not None:
        lines.append(f"failed requests <= {errors} at concurrency {target}")
    regression = gate.get("regression") or {}
    if regression.get("max_p99_regression_pct") is not None:
        lines.append(f"p99 regression against the previous run <= "
                     f"{regression['max_p99_regression_pct']:g} %"
                     + ("" if regression.get("status") not in (None, "no baseline")
                        else " (no previous run: not checked)"))
    return lines


RECORDED = "recorded by the benchmark from the running server"


def served_models(bench: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each model's config as the running server reported it (the result's ``server`` block),
    for the models it answered for; empty for a result without the block."""
    models = (bench.get("server") or {}).get("models") or {}
    return {name: config for name, config in models.items() if config}


def served_settings(config: dict[str, Any]) -> dict[str, Any]:
    """A served model config (``server.models[<model>]``) as the settings ``settings_text``
    shows."""
    groups = config.get("instance_group") or []
    batching = config.get("dynamic_batching")
    kinds = sorted({str(group.get("kind")) for group in groups if group.get("kind")})
    return {
        "instance_count": sum(int(group.get("count", 0)) for group in groups) if groups else None,
        "instance_kind": "/".join(kinds) or None,
        "max_batch_size": config.get("max_batch_size"),
        "dynamic_batching": batching is not None,
        "max_queue_delay_us": None if batching is None
        else batching.get("max_queue_delay_microseconds"),
        "preferred_batch_size": None if batching is None
        else batching.get("preferred_batch_size") or None,
    }


def _serving(gate: dict[str, Any], bench: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The serving settings measured and where they come from: the chosen variant's config as
    the running server reported it (the benchmark's ``server`` block), the benchmark result's
    own record when it has one, else the gate's knowledge of the pipeline's defaults."""
    served = served_models(bench)
    if served.get(gate.get("variant")):
        return served_settings(served[gate["variant"]]), RECORDED
    if bench.get("serving"):
        return bench["serving"], "recorded by the benchmark"
    environment = gate.get("environment") or {}
    if environment.get("serving"):
        return environment["serving"], "torchship's defaults, which the benchmark builds with"
    return {}, NOT_RECORDED


def settings_text(serving: dict[str, Any]) -> str:
    if not serving:
        return NOT_RECORDED
    parts = []
    if serving.get("instance_count") is not None:
        count = int(serving["instance_count"])
        parts.append(f"{count} instance{'s' if count != 1 else ''}"
                     + (f" ({serving['instance_kind']})" if serving.get("instance_kind") else ""))
    if serving.get("max_batch_size") is not None:
        parts.append(f"max batch size {serving['max_batch_size']}")
    if serving.get("max_queue_delay_us") is not None:
        parts.append(f"dynamic batching, max queue delay {serving['max_queue_delay_us'] / 1000:g} "
                     f"ms")
    elif serving.get("dynamic_batching") is False:
        parts.append("no dynamic batching")
    if serving.get("preferred_batch_size"):
        parts.append("preferred batch size "
                     + ", ".join(str(size) for size in serving["preferred_batch_size"]))
    return ", ".join(parts) or NOT_RECORDED


def chosen_line(gate: dict[str, Any], bench: dict[str, Any]) -> str:
    variant = gate.get("variant")
    if not variant:
        return "Chosen: none; no variant meets every constraint"
    serving, source = _serving(gate, bench)
    return (f"Chosen: {variant}, served with {settings_text(serving)} ({source}; the serving "
            "search after the gate may choose others)")


def _metric_header(metric: str) -> str:
    if metric.startswith("latency_b") and metric.endswith("_ms"):
        return f"ORT b{metric[9:-3]} ms (optimised)"
    if metric.endswith("_bytes"):
        return f"{metric.removesuffix('_bytes')} KiB (optimised)"
    return f"{metric} (optimised)"


def _metric_value(metric: str, value: float) -> str:
    if metric.endswith("_ms"):
        return f"{value:.3f}"
    return f"{value / 1024:.1f}" if metric.endswith("_bytes") else f"{value:.4g}"


def candidate_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]], int | None]:
    """Header, one row per variant (accuracy, size, the optimised metric, p99 and throughput at
    the target concurrency, and why it won or lost), and the chosen row's index."""
    gate = summary.get("gate") or {}
    choice = gate.get("choice") or {}
    table = choice.get("table") or []
    if not table:
        return [], [], None
    metric, target = choice["optimise"], target_level(gate)
    measured = {(r["model"], int(r["concurrency"])): r
                for r in (summary.get("benchmark") or {}).get("results", [])
                if int(r.get("batch_size", 1)) == int(summary.get("batch_size", 1))}
    header = ["variant", "test acc", "ONNX KiB", _metric_header(metric), f"p99 ms c{target}",
              f"req/s c{target}", "outcome"]
    body, chosen = [], None
    for index, row in enumerate(table):
        level = measured.get((row["name"], target)) or {}
        value = row.get(metric)
        accuracy = row.get("onnx_test_accuracy", row.get("test_accuracy"))
        size = row.get("onnx_size_bytes")
        if row.get("chosen"):
            chosen = index
        body.append([
            row["name"], "-" if accuracy is None else f"{accuracy:.4f}",
            "-" if size is None else f"{size / 1024:.1f}",
            "-" if value is None else _metric_value(metric, value),
            "-" if level.get("p99_ms") is None else f"{level['p99_ms']:.2f}"
            + ("*" if level.get("stable") is False else ""),  # unstable, as the tables mark it
            "-" if level.get("throughput_rps") is None else f"{level['throughput_rps']:.0f}",
            row.get("outcome") or ("chosen" if row.get("chosen") else
                                   "meets every constraint" if row.get("meets_constraints")
                                   else "fails a constraint"),
        ])
    return header, body, chosen


def _clients(rows: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for row in rows:
        client = row.get("client") or {}
        if client.get("name"):
            name = f"{client['name']} {client.get('version') or ''}".strip()
            counts[name] = counts.get(name, 0) + 1
    if not counts:
        return NOT_RECORDED
    return ", ".join(f"{name} ({n} of {len(rows)} levels)" for name, n in counts.items())


def _backend(recorded: str | None, environment: dict[str, Any],
             served: dict[str, list[str]] | None = None) -> str:
    """The backend text; ``served``: the models the running server reported on each backend."""
    served = served or {}
    recorded = recorded or (next(iter(served)) if len(served) == 1 else None)
    backend = recorded or environment.get("backend")
    if not backend and not served:
        return NOT_RECORDED
    if len(served) > 1:  # models on different backends: each with its own
        return "; ".join(f"{name} for {', '.join(models)}" for name, models in served.items())
    text = backend + (f" for {', '.join(served[backend])}" if backend in served else "")
    if backend == "python":
        runtime = environment.get("onnxruntime")
        text += f" (ONNX Runtime{' ' + runtime.split()[-1] if runtime else ''} in Triton's " \
                "Python backend)"
    if not recorded:
        text += ", not recorded by the benchmark: the pipeline benchmarks a python-backend " \
                "repository"
    if backend == "python":
        text += (f"; Vertex AI and KServe serve with the "
                 f"{environment.get('cloud_backend', 'onnxruntime')} backend")
    return text


def _triton_server(bench: dict[str, Any], environment: dict[str, Any]) -> str:
    server = bench.get("server") or {}
    version = bench.get("triton_version") or server.get("version")
    if version:
        where = [str(w) for w in (version, server.get("binary"), server.get("kind")) if w]
        return f"{', '.join(where)} ({RECORDED})"
    package = environment.get("triton_package")
    why = "; ".join(server.get("errors") or [])
    return (f"version {NOT_RECORDED} by the benchmark" + (f" ({why})" if why else "")
            + (f" (tritonserver bundled in {package}, where the gate ran)" if package else ""))


def _served_backends(served: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """The models the running server reported on each backend (or platform)."""
    by: dict[str, list[str]] = {}
    for name, config in served.items():
        by.setdefault(config.get("backend") or config.get("platform") or NOT_RECORDED,
                      []).append(name)
    return by


def _serving_row(gate: dict[str, Any], bench: dict[str, Any]) -> str:
    """Each served model's settings as the server reported them (one line when all agree),
    else the settings known from elsewhere and where they come from."""
    served = served_models(bench)
    if not served:
        serving, source = _serving(gate, bench)
        return settings_text(serving) + ("" if source == NOT_RECORDED else f" ({source})")
    texts = {name: settings_text(served_settings(config)) for name, config in served.items()}
    if len(set(texts.values())) == 1:
        return f"{next(iter(texts.values()))} (every model: {', '.join(texts)}; {RECORDED})"
    return "; ".join(f"{name}: {text}" for name, text in texts.items()) + f" ({RECORDED})"


def environment_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, value) for the environment block, from the benchmark result and the gate's
    record; a field neither holds reads ``not recorded``."""
    bench = summary.get("benchmark") or {}
    gate = summary.get("gate") or {}
    host, environment = bench.get("host") or {}, gate.get("environment") or {}
    rows = bench.get("results") or []
    cores = host.get("cpu_count")
    out = [("CPU", f"{host.get('cpu_model') or 'model ' + NOT_RECORDED}, "
                   + (f"{cores} cores" if cores else f"cores {NOT_RECORDED}"))]
    if host.get("platform"):
        out.append(("platform", host["platform"]))
    out.append(("Triton server", _triton_server(bench, environment)))
    out.append(("backend", _backend(bench.get("backend"), environment,
                                    _served_backends(served_models(bench)))))
    out.append(("serving settings", _serving_row(gate, bench)))
    out.append(("protocol", f"{bench.get('protocol', NOT_RECORDED)}, "
                            f"{bench.get('mode') or 'mode ' + NOT_RECORDED}"
                            + (" (server launched by the benchmark)"
                               if bench.get("mode") == "local" else "")))
    out.append(("load client", _clients(rows)))
    shares = {(row.get("client") or {}).get("shares_host") for row in rows} - {None}
    out.append(("client shares the host with the server",
                NOT_RECORDED if not shares else "yes" if shares == {True} else
                "no" if shares == {False} else "on some levels"))
    target = target_level(gate) if gate else None
    variant = gate.get("variant")
    costly = [r for r in rows if r.get("model") == variant
              and int(r["concurrency"]) == target] or rows[-1:]
    for row in costly[:1]:
        client = row.get("client") or {}
        parts = []
        if client.get("cpu_s_per_request") is not None:
            parts.append(f"{client['cpu_s_per_request'] * 1e3:.3f} ms CPU per request")
        if client.get("cpu_cores") is not None:
            parts.append(f"{client['cpu_cores']:.2f} cores busy")
        out.append((f"client cost ({row['model']}, concurrency {row['concurrency']})",
                    ", ".join(parts) or NOT_RECORDED))
        if client.get("fallback"):
            out.append(("client fallback", client["fallback"]))
    return out
