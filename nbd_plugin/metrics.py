"""Prometheus text exposition of a session's status (``nbdrep status --prometheus``)."""

COUNTERS = ("writes", "extents", "bytes_written", "bytes_copied", "bytes_zeroed")


def prometheus(status):
    """Render the status dict as Prometheus text format 0.0.4. O(history)."""
    committed = [c for c in status["cycles"] if c["state"] == "committed"]
    lines = [
        _metric("nbdrep_cycle", "gauge", "Open cycle id.", status["cycle"]),
        _metric("nbdrep_committed_cycle", "gauge", "Newest cycle committed on the replicas.",
                status["committed_cycle"] or 0),
        _metric("nbdrep_lag_seconds", "gauge", "Now minus the RP time of the newest committed cycle.",
                -1 if status["lag"] is None else round(status["lag"], 3)),
        _metric("nbdrep_tracker_memory_bytes", "gauge", "Memory of the tracker's TE arrays.",
                status["tracker"]["memory_bytes"]),
        _metric("nbdrep_keepaside_bytes", "gauge", "Bytes kept aside for the cycle being copied.",
                status["keepaside"]["mem_bytes"] + status["keepaside"]["spill_bytes"]),
    ]
    for key in COUNTERS:
        total = sum(c[key] for c in committed)
        lines.append(_metric(f"nbdrep_recent_{key}", "gauge",
                             f"Sum of {key} over the recent committed cycles in status.", total))
    return "\n".join(lines) + "\n"


def _metric(name, kind, help_text, value):
    return f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n{name} {value}"
