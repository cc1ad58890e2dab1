"""Judging measured serving candidates (variant x Triton settings) by the objective: which
qualify, their value, the spread band within which two cannot be told apart, the choice, the
Pareto front, and the candidates shown as text, Markdown and KFP metrics. The search that
measures them is `stage` (rounds: `halving`)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from torchship.components.benchmark.stats import spread_pct as window_spread_pct
from torchship.components.contracts import ServingSettings
from torchship.components.files import write_text
from torchship.components.report.tables import cell, markdown_table, text_table

__all__ = ["DEFAULT_SETTINGS", "MARGIN_PCT", "TUNED", "band_against", "choose_settings", "cores",
           "format_candidate_table", "gain_pct", "level_of", "pareto_front", "pass_gains_pct",
           "serving_metrics", "serving_objective", "spread_of", "spread_pct", "value_of",
           "variant_property", "versus_default", "why_not", "write_candidate_table"]

# The settings searched, with the defaults every deploy starts from.
TUNED = ("instance_count", "max_queue_delay_us", "max_batch_size")
DEFAULT_SETTINGS = {name: int(getattr(ServingSettings, name)) for name in TUNED}
# A candidate must beat a simpler one by more than this (or the windows' spread) to be chosen.
MARGIN_PCT = 5.0
_LATENCY_OBJECTIVE = re.compile(r"latency|latency_b\d+_ms|speedup_b\d+")


def serving_objective(optimise: str, latency_budget_p99_ms: float | None,
                      throughput_target_rps: float | None = None) -> str:
    """``throughput_per_core`` (highest req/s per core: under a p99 budget or a throughput
    target, and for an `optimise` that serving does not change) or ``latency`` (lowest p99, for
    a latency `optimise` with neither)."""
    if latency_budget_p99_ms or throughput_target_rps:
        return "throughput_per_core"
    return "latency" if _LATENCY_OBJECTIVE.fullmatch(optimise) else "throughput_per_core"


def variant_property(optimise: str) -> bool:
    """Whether `optimise` is a property of the model file (size, accuracy, parameters), which
    the gate already chose the variant by, not something serving settings change."""
    return not _LATENCY_OBJECTIVE.fullmatch(optimise)


def cores(candidate: dict[str, Any]) -> int:
    """The cores a candidate holds: one per instance (each runs ONNX Runtime on one thread)."""
    return int(candidate["settings"]["instance_count"])


def level_of(candidate: dict[str, Any], objective: dict[str, Any]) -> dict[str, Any] | None:
    """The candidate's latest measurement at the target concurrency (None: never measured)."""
    return candidate["levels"].get(f"c{objective['target_concurrency']}")


def value_of(candidate: dict[str, Any], objective: dict[str, Any]) -> float:
    """The objective's value (higher is better for throughput per core, lower for p99)."""
    level = level_of(candidate, objective)
    if objective["metric"] == "latency":
        return float(level["p99_ms"])
    return float(level["throughput_rps"]) / cores(candidate)


def spread_of(candidate: dict[str, Any], objective: dict[str, Any]) -> float:
    """The measured spread (%) on the objective's metric: of the windows, or of the final
    round's interleaved passes."""
    key = "p99_ms" if objective["metric"] == "latency" else "throughput_rps"
    return float((level_of(candidate, objective)["spread_pct"] or {}).get(key) or 0.0)


def spread_pct(values: list[float]) -> float:
    """The benchmark's window statistic (``stats.spread_pct``: largest distance from the mean,
    in % of the mean) over passes or ratios; 0 where it is undefined (no values, a mean <= 0)."""
    spread = window_spread_pct(values)
    return 0.0 if math.isinf(spread) else spread


def pass_gains_pct(candidate: dict[str, Any], than: dict[str, Any],
                   objective: dict[str, Any]) -> list[float]:
    """How much ``candidate`` beats ``than`` in each interleaved pass of the final round, in %
    of ``than``'s value in that pass (empty: not measured in the same passes)."""
    ours = (level_of(candidate, objective) or {}).get("passes") or []
    theirs = (level_of(than, objective) or {}).get("passes") or []
    if not ours or len(ours) != len(theirs):
        return []
    key = "p99_ms" if objective["metric"] == "latency" else "throughput_rps"
    gains = []
    for a, b in zip(ours, theirs):
        if objective["metric"] == "latency":
            gains.append((b[key] - a[key]) / a[key] * 100.0)  # `than`'s p99 over ours
        else:
            a_core, b_core = a[key] / cores(candidate), b[key] / cores(than)
            gains.append((a_core - b_core) / b_core * 100.0)
    return gains


def band_against(candidate: dict[str, Any], than: dict[str, Any],
                 objective: dict[str, Any]) -> float:
    """The band (%) within which ``candidate`` and ``than`` cannot be told apart: the margin,
    either one's measured spread, or the spread of their paired per-pass ratios, the largest."""
    ratios = [1 + gain / 100.0 for gain in pass_gains_pct(candidate, than, objective)]
    return max(float(objective["margin_pct"]), spread_of(candidate, objective),
               spread_of(than, objective), spread_pct(ratios) if len(ratios) > 1 else 0.0)


def why_not(candidate: dict[str, Any], objective: dict[str, Any],
            allow_spread: bool) -> str | None:
    """Why the candidate's latest measurement fails a constraint (None: it meets them). With
    `allow_spread`, only a failure beyond the windows' measured spread counts (an early round's
    short windows: a candidate is dropped only when it cannot meet the constraint)."""
    level, target = level_of(candidate, objective), objective["target_concurrency"]
    if level["errors"]:
        return f"{level['errors']} failed requests at concurrency {target}"
    budget, floor = objective.get("latency_budget_p99_ms"), objective.get("throughput_target_rps")
    spread = (level["spread_pct"] or {}) if allow_spread else {}
    p99_low = level["p99_ms"] * (1 - float(spread.get("p99_ms") or 0) / 100)
    if budget and p99_low > budget:
        return (f"p99 {level['p99_ms']:.2f} ms at concurrency {target} is over the budget of "
                f"{budget:g} ms")
    rps_high = level["throughput_rps"] * (1 + float(spread.get("throughput_rps") or 0) / 100)
    if floor and rps_high < floor:
        return (f"{level['throughput_rps']:.0f} req/s at concurrency {target} is under the "
                f"target of {floor:g} req/s")
    return None


def gain_pct(better: dict[str, Any], than: dict[str, Any], objective: dict[str, Any]) -> float:
    """How much ``better`` beats ``than`` on the objective, in % of ``than``'s value."""
    a, b = value_of(better, objective), value_of(than, objective)
    change = a - b if objective["metric"] != "latency" else b - a
    return change / b * 100.0 if b > 0 else float("inf")


def choose_settings(candidates: list[dict[str, Any]], objective: dict[str, Any],
                    default: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"chosen", "variant", "settings", "reason", "band_pct", "tied", "versus_default"}`` for
    the finalists among ``candidates`` (those measured in the last round that meet the
    constraints). The incumbent (the candidate marked ``incumbent``: the gate's variant with the
    default settings), when it qualifies, is replaced only by a challenger that beats it by more
    than ``band_against`` (the margin, either's spread over the interleaved passes, or the spread
    of their paired per-pass ratios); when none does, the record says the search could not tell
    them from the default, and the default is chosen. Among the challengers that do (or all
    finalists, without a qualifying incumbent): the best on the objective; every one the best
    does not beat by more than the band is tied with it, and of the tied the simplest (lowest
    ``simplicity``) is chosen. None qualifying: ``default`` (``{"variant", "settings"}``)."""
    qualifying = sorted((c for c in candidates if c.get("qualifies")),
                        key=lambda c: c["simplicity"])
    if not qualifying:
        default = default or {"variant": None, "settings": dict(DEFAULT_SETTINGS)}
        lost = "; ".join(f"{c['model']}: {c['why_not']}" for c in candidates)
        return {"chosen": None, "variant": default["variant"],
                "settings": dict(default["settings"]), "band_pct": None, "tied": [],
                "versus_default": None,
                "reason": (f"no candidate qualifies ({lost}); keeping "
                           f"{default['variant'] or 'the model'} with the default settings "
                           f"({describe(default['settings'])}) under which the gate passed it")}
    pick = min if objective["metric"] == "latency" else max
    incumbent = next((c for c in qualifying if c.get("incumbent")), None)
    if incumbent is not None:
        shown = [c for c in qualifying if c is not incumbent
                 and gain_pct(c, incumbent, objective) > band_against(c, incumbent, objective)]
        if not shown:
            return _keep_incumbent(incumbent, qualifying, objective)
        qualifying = shown

    def band(candidate: dict[str, Any]) -> float:
        return max(float(objective["margin_pct"]), spread_of(best, objective),
                   spread_of(candidate, objective))

    best = pick(qualifying, key=lambda c: value_of(c, objective))  # ties: the simpler
    tied = [c for c in qualifying if gain_pct(best, c, objective) <= band(c)]
    chosen = tied[0]
    shown_text = _shown(best, objective)
    finalists = f"{len(qualifying)} finalist{'s' if len(qualifying) != 1 else ''}"
    of = f"of the {finalists} that meet the constraints"
    if incumbent is not None:
        of = f"of the {finalists} shown better than the default"
    if len(tied) > 1:
        reason = (f"could not tell apart {len(tied)} candidates ({', '.join(c['model'] for c in tied)}):"
                  f" the best, {best['model']} ({shown_text}), beats none of them by more than "
                  f"the band (margin {objective['margin_pct']:g}% or the windows' spread, up to "
                  f"{max(band(c) for c in tied):.1f}%), so the simplest, {chosen['model']}, is "
                  "chosen")
    else:
        reason = f"{best['model']} has the best {shown_text} {of}"
        others = [c for c in qualifying if c is not best]
        if others:
            closest = min(others, key=lambda c: gain_pct(best, c, objective))
            reason += (f", {gain_pct(best, closest, objective):.1f}% better than the next "
                       f"({closest['model']}), beyond the {band(closest):.1f}% band")
    versus = None
    if incumbent is not None:
        versus = _versus(chosen, incumbent, objective)
        reason += (f"; it beats the default, {incumbent['model']}, by {versus['gain_pct']:.1f}%, "
                   f"beyond the {versus['band_pct']:.1f}% band of their interleaved passes")
    return {"chosen": chosen["model"], "variant": chosen["variant"],
            "settings": dict(chosen["settings"]), "band_pct": band(chosen),
            "tied": [c["model"] for c in tied] if len(tied) > 1 else [],
            "versus_default": versus, "reason": reason}


def _versus(candidate: dict[str, Any], incumbent: dict[str, Any],
            objective: dict[str, Any]) -> dict[str, Any]:
    """The head-to-head of ``candidate`` against the incumbent, as the record keeps it."""
    return {"default": incumbent["model"], "candidate": candidate["model"],
            "gain_pct": gain_pct(candidate, incumbent, objective),
            "band_pct": band_against(candidate, incumbent, objective),
            "pass_gains_pct": [round(g, 2) for g in pass_gains_pct(candidate, incumbent,
                                                                    objective)]}


def _keep_incumbent(incumbent: dict[str, Any], qualifying: list[dict[str, Any]],
                    objective: dict[str, Any]) -> dict[str, Any]:
    """The choice when no finalist is shown better than the incumbent: the incumbent, tied with
    every finalist within the band of it either way."""
    pick = min if objective["metric"] == "latency" else max
    best = pick(qualifying, key=lambda c: value_of(c, objective))
    tied = [incumbent] + [c for c in qualifying if c is not incumbent
                          and gain_pct(incumbent, c, objective) <= band_against(c, incumbent,
                                                                                objective)]
    versus = _versus(best, incumbent, objective)
    reason = (f"no finalist is shown better than the default, {incumbent['model']} "
              f"({_shown(incumbent, objective)}): ")
    if best is incumbent:
        reason += "it is the best of the finalists"
    else:
        reason += (f"the best, {best['model']}, is {versus['gain_pct']:.1f}% better, within the "
                   f"{versus['band_pct']:.1f}% band (margin {objective['margin_pct']:g}%, the "
                   "spread of their interleaved passes, or of their per-pass ratios)")
    reason += "; the search could not tell " + (
        f"{', '.join(c['model'] for c in tied[1:])} from the default, so" if len(tied) > 1
        else "a better one, so") + " the default is chosen"
    band = max([band_against(c, incumbent, objective) for c in tied[1:]]
               or [float(objective["margin_pct"])])
    return {"chosen": incumbent["model"], "variant": incumbent["variant"],
            "settings": dict(incumbent["settings"]), "band_pct": band,
            "tied": [c["model"] for c in tied] if len(tied) > 1 else [],
            "versus_default": versus if best is not incumbent else None, "reason": reason}


def versus_default(candidate: dict[str, Any], record: dict[str, Any],
                   finalists: list[dict[str, Any]]) -> str | None:
    """A finalist's outcome against the incumbent (None: it had no qualifying incumbent to
    beat, or it was shown better than it and lost to another challenger)."""
    objective = record["objective"]
    incumbent = next((c for c in finalists if c.get("incumbent") and c.get("qualifies")), None)
    if incumbent is None or not candidate.get("qualifies") or candidate["model"] == record["chosen"]:
        return None
    if candidate is incumbent:
        versus = record["versus_default"]
        return (f"the default: {record['chosen']} beats it by {versus['gain_pct']:.1f}%, beyond "
                f"the {versus['band_pct']:.1f}% band of their interleaved passes")
    gain, band = gain_pct(candidate, incumbent, objective), band_against(candidate, incumbent,
                                                                        objective)
    behind = gain_pct(incumbent, candidate, objective)
    if gain > band:
        return None
    if gain > 0:
        return (f"not shown better than the default ({incumbent['model']}): {gain:.1f}% better, "
                f"within the {band:.1f}% band of their interleaved passes")
    where = "beyond" if behind > band else "within"
    return (f"lost to the default ({incumbent['model']}): it is {behind:.1f}% better, {where} the "
            f"{band:.1f}% band of their interleaved passes")


def pareto_front(candidates: list[dict[str, Any]], target: int,
                 last_round: int | None = None) -> list[str]:
    """The measured candidates no other beats on both throughput and p99 at the target
    concurrency (each by its latest measurement), lowest p99 first. With ``last_round``, only
    candidates measured in that round count: an earlier round's shorter windows are not
    comparable with the final round's."""
    points = [(c["model"], c["levels"][f"c{target}"]) for c in candidates
              if c["levels"].get(f"c{target}") and not c["levels"][f"c{target}"]["errors"]
              and (last_round is None
                   or (c.get("rounds") or [{}])[-1].get("round") == last_round)]
    front = [
        (level["p99_ms"], name) for name, level in points
        if not any(o["p99_ms"] <= level["p99_ms"] and o["throughput_rps"] >= level["throughput_rps"]
                   and (o["p99_ms"], o["throughput_rps"]) != (level["p99_ms"], level["throughput_rps"])
                   for _, o in points)
    ]
    return [name for _, name in sorted(front)]


def _shown(candidate: dict[str, Any], objective: dict[str, Any]) -> str:
    at = f"at concurrency {objective['target_concurrency']}"
    if objective["metric"] == "latency":
        return f"p99 {value_of(candidate, objective):.2f} ms {at}"
    return f"{value_of(candidate, objective):.0f} req/s per core {at}"


def format_candidate_table(record: dict[str, Any], markdown: bool = False) -> str:
    """One row per candidate: variant, settings, the rounds it was measured in, p50, p99 and
    throughput (per core) of its latest measurement, and its outcome; the chosen one marked,
    Pareto-optimal ones starred, the reason below (Markdown: with a title)."""
    level = f"c{record['objective']['target_concurrency']}"
    header = ["candidate", "variant", "instances", "delay us", "max batch", "rounds",
              f"p50 ms {level}", f"p99 ms {level}", f"req/s {level}", "req/s/core", "outcome"]
    front = set(record.get("pareto_front") or [])
    body = []
    for candidate in record["candidates"]:
        mark = " (chosen)" if candidate["model"] == record["chosen"] else ""
        settings = candidate["settings"]
        line = [candidate["model"] + mark + (" *" if candidate["model"] in front else ""),
                candidate["variant"], str(settings["instance_count"]),
                str(settings["max_queue_delay_us"]), str(settings["max_batch_size"]),
                str(len(candidate.get("rounds") or []))]
        measured = candidate["levels"].get(level)
        if measured:
            unstable = "" if measured.get("stable", True) else "~"
            line += [cell(measured.get("p50_ms"), "{:.2f}"),
                     cell(measured["p99_ms"], "{:.2f}") + unstable,
                     cell(measured["throughput_rps"], "{:.0f}"),
                     cell(measured["throughput_rps"] / cores(candidate), "{:.0f}")]
        else:
            line += ["-"] * 4
        line.append(candidate.get("outcome") or ("yes" if candidate.get("qualifies")
                                                 else f"no: {candidate.get('why_not')}"))
        body.append(line)
    left = (0, 1, len(header) - 1)
    if not markdown:
        return "\n".join(text_table(header, body, left))
    chosen = (f"chosen: {record['variant']} with {describe(record['settings'])}: "
              f"{record['reason']}")
    return "\n".join(["# Serving search", "", objective_text(record["objective"]), "",
                      *markdown_table(header, body, left), "",
                      ("`*`: on the Pareto front of the last round's candidates (throughput vs "
                       "p99); `~`: windows disagreed"), "",
                      chosen]) + "\n"


def write_candidate_table(record: dict[str, Any], path: str | os.PathLike) -> Path:
    """The candidate table as Markdown, for the KFP artifact the pipeline UIs render."""
    return write_text(path, format_candidate_table(record, markdown=True))


def serving_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The chosen settings and, when measured, their p99 and throughput, for KFP."""
    metrics = {f"serving_{name}": float(value) for name, value in record["settings"].items()}
    metrics["serving_candidates"] = float(len(record["candidates"]))
    metrics["serving_tied"] = float(len(record.get("tied") or []))
    chosen = next((c for c in record["candidates"] if c["model"] == record["chosen"]), None)
    for level, measured in (chosen["levels"] if chosen else {}).items():
        metrics[f"serving_p99_ms_{level}"] = float(measured["p99_ms"])
        metrics[f"serving_throughput_rps_{level}"] = float(measured["throughput_rps"])
        metrics[f"serving_throughput_per_core_{level}"] = (
            float(measured["throughput_rps"]) / cores(chosen))
    return metrics


def describe(settings: dict[str, int]) -> str:
    return ", ".join(f"{name} {value}" for name, value in settings.items())


def objective_text(objective: dict[str, Any]) -> str:
    at = f"at concurrency {objective['target_concurrency']}"
    limits = []
    if objective.get("latency_budget_p99_ms"):
        limits.append(f"p99 within {objective['latency_budget_p99_ms']:g} ms")
    if objective.get("throughput_target_rps"):
        limits.append(f"at least {objective['throughput_target_rps']:g} req/s")
    under = f" with {' and '.join(limits)}" if limits else ""
    if objective["metric"] == "latency":
        return f"lowest p99 {at} (optimise '{objective['optimise']}')"
    return f"highest throughput per core {at}{under} (optimise '{objective['optimise']}')"
