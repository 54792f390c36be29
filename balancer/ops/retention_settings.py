"""The [retention] configuration section (pure: `balancer.config` imports it)."""

from __future__ import annotations

from dataclasses import dataclass

from balancer.config_values import _int_min, _positive_float, _Section


@dataclass(frozen=True)
class RetentionConfig:
    """[retention]: how long and how much of our own tables to keep (0: no limit)."""

    decision_log_days: int = 30
    decision_log_max_rows: int = 5_000_000
    call_retries_days: int = 14
    batch_rows: int = 2_000
    interval_s: float = 300.0


def parse_retention(section: _Section) -> RetentionConfig:
    """The [retention] table, validated."""
    config = RetentionConfig(
        decision_log_days=section.get("decision_log_days", 30, _int_min(0)),
        decision_log_max_rows=section.get("decision_log_max_rows", 5_000_000, _int_min(0)),
        call_retries_days=section.get("call_retries_days", 14, _int_min(0)),
        batch_rows=section.get("batch_rows", 2_000, _int_min(1)),
        interval_s=section.get("interval_s", 300.0, _positive_float),
    )
    section.done()
    return config
