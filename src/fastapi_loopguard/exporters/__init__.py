"""Where blocking events go: logs, Prometheus, OpenTelemetry. One small base, one file each.

``build`` makes the ones a config asks for; each is imported only then, so the optional
dependencies (prometheus-client, opentelemetry-api) are needed only by those who enable them.
Exporters depend on the events and on ``StatsSource`` (engine totals), never on the guard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Exporter, StatsSource

if TYPE_CHECKING:
    from ..config import LoopGuardConfig

__all__ = ["Exporter", "StatsSource", "build"]


def build(cfg: LoopGuardConfig, source: StatsSource) -> list[Exporter]:
    """The exporters the config asks for; each optional dependency is imported only if asked.

    ``source`` is what the metric exporters read engine totals from at scrape time.
    """
    exporters: list[Exporter] = []
    if cfg.log_blocking_events:
        from .logging import LoggingExporter

        exporters.append(LoggingExporter(cfg.log_format, cfg.log_rate_limit_per_minute))
    if cfg.prometheus_enabled:
        from .prometheus import PrometheusExporter

        exporters.append(PrometheusExporter(source, cfg.prometheus_registry))
    if cfg.otel_enabled:
        from .otel import OTelExporter

        exporters.append(OTelExporter(source))
    return exporters
