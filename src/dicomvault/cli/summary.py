"""The human-readable summary printed at the end of an operation."""
from __future__ import annotations

from dicomvault.engine import Report

VERDICT = {0: "done", 1: "partly done", 2: "failed"}


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def _value(value: object) -> str:
    """Details as a person reads them: ``a 1, b 2`` rather than a Python dict."""
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_value(v)}" if isinstance(v, dict) else f"{v} {k}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_value(v) for v in value)
    return str(value)


def print_summary(report: Report) -> None:
    print(f"{report.operation}: {VERDICT.get(report.exit_code, 'failed')} in {report.seconds:.1f} s")
    for what, counts in report.counts.items():
        parts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
        print(f"  {what if what.endswith('s') else what + 's'}: {parts}")
    if report.bytes:
        print(f"  data written: {_size(report.bytes)}")
    for key, value in report.details.items():
        if value in ("", [], {}, None):
            continue  # nothing to say (an empty "left in source", say): no empty line
        print(f"  {key}: {_value(value)}")
    for w in report.warnings:
        print(f"  warning: {w}")
    if report.problems:
        print(f"  {len(report.problems)} problem(s); each was named above (or see --json)")
    if report.aborted:
        print(f"  aborted: {report.aborted}")
