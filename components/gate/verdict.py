"""What a gate check says, and the verdict line that counts them honestly.

A check is ``passed``, ``failed`` or ``not checked``: one that could not be evaluated (no p99
budget given, no previous run, parity not required, no bar for a first run's accuracy) keeps
``passed`` null and says why; it neither passes nor fails the gate, and the verdict counts it
apart: ``3 checks passed for int8, 2 not checked (p99 latency: no p99 budget given; p99
regression: no previous run)``.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["check", "first_run_accuracy", "not_checked", "regression_check", "verdict_reason"]


def check(name: str, variant: str, passed: bool, value, threshold, detail: str) -> dict:
    """A check that was evaluated."""
    return {"name": name, "variant": variant, "passed": bool(passed),
            "status": "passed" if passed else "failed", "why": None, "value": value,
            "threshold": threshold, "detail": detail}


def not_checked(name: str, variant: str, why: str, value=None, threshold=None,
                detail: str | None = None) -> dict:
    """A check that was not evaluated: neither passed nor failed, with the reason (`why`, a few
    words for the verdict line; `detail`, the full sentence)."""
    return {"name": name, "variant": variant, "passed": None, "status": "not checked",
            "why": why, "value": value, "threshold": threshold,
            "detail": detail or f"{variant}: not checked: {why}"}


def first_run_accuracy(name: str, accuracy: float, floor: float,
                       majority: tuple[str, float] | None, where: str = "") -> dict:
    """A first run's accuracy (no serving baseline) against the larger of the floor the user
    set and the test split's majority-class rate (strictly above it: always guessing that class
    scores it); ``bar`` says which applied. Not checked when neither means anything (no floor
    set, no test labels)."""
    if majority is None and not floor > 0:
        return not_checked(
            "accuracy", name, "no serving baseline, no accuracy_floor set and no test labels "
            "for the majority-class rate", accuracy, None,
            f"{name}: first run, no serving baseline{where}: test accuracy {accuracy:.4f} not "
            "checked (set accuracy_floor, or give the gate the test split)")
    guess, rate = majority if majority is not None else (None, None)
    by_majority = rate is not None and rate >= floor
    passed = accuracy >= floor - 1e-12 and (rate is None or accuracy > rate + 1e-9)
    bar = {"applied": "majority-class rate" if by_majority else "accuracy floor",
           "threshold": rate if by_majority else floor, "accuracy_floor": floor,
           "majority_class": guess, "majority_rate": rate}
    if by_majority:
        text = (f"majority-class rate {rate:.4f} (always predicting '{guess}'; at least the "
                f"accuracy floor {floor:.4f})")
    else:
        text = f"floor {floor:.4f} (accuracy_floor" + (
            f"; above the majority-class rate {rate:.4f})" if rate is not None else ")")
    evaluated = check("accuracy", name, passed, accuracy, bar["threshold"],
                      f"{name}: first run, no serving baseline{where}: test accuracy "
                      f"{accuracy:.4f} vs {text}")
    return {**evaluated, "bar": bar}


def regression_check(regression: dict | None, variants: str, block: bool) -> dict:
    """p99 against the previous run (``regression.compare_with_previous``'s record): not
    checked without a previous run, or when it measured none of these levels."""
    if regression is None or regression.get("status") == "no baseline":
        summary = (regression or {}).get("summary") or "no previous run given"
        why = ("the previous run measured none of these levels" if "measured none" in summary
               else "no previous run")
        return not_checked("p99 regression", variants, why, None,
                           (regression or {}).get("max_p99_regression_pct"), summary)
    flagged = bool(regression.get("flagged"))
    return check(
        "p99 regression", variants, not (flagged and block),
        regression.get("worst_change_pct"), regression.get("max_p99_regression_pct"),
        regression.get("summary", "") + ("" if block or not flagged
                                         else " (flagged, not blocking)"))


def verdict_reason(checks: list[dict], candidates: Sequence[str]) -> str:
    """One line: the first failed check (and how many more), or how many checks passed (with
    the p99 budget's detail); then how many were not checked and why, each reason once."""
    failed = [c for c in checks if c["status"] == "failed"]
    passed = [c for c in checks if c["status"] == "passed"]
    skipped = [c for c in checks if c["status"] == "not checked"]
    whys = list(dict.fromkeys(f"{c['name']}: {c['why']}" for c in skipped))
    unchecked = f"{len(skipped)} not checked ({'; '.join(whys)})" if skipped else ""
    if failed:
        reason = failed[0]["detail"] + (f" (+{len(failed) - 1} more failed checks)"
                                         if len(failed) > 1 else "")
        return reason + (f"; {unchecked}" if skipped else "")
    names = ", ".join(candidates)
    if not passed:
        return f"no check could be evaluated for {names}: {unchecked}"
    plural = "s" if len(passed) != 1 else ""
    reason = (f"{len(passed)} check{plural} passed for {names}, {unchecked}" if skipped
              else f"all {len(passed)} check{plural} passed for {names}")
    latency = [c for c in passed if c["name"] == "p99 latency"]
    if latency:
        reason += "; " + "; ".join(c["detail"] for c in latency)
    return reason
