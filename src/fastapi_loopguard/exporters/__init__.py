"""Where blocking events go: logs, Prometheus, OpenTelemetry. One small base, one file each.

The guard builds the ones its config asks for; each is imported only then, so the optional
dependencies (prometheus-client, opentelemetry-api) are needed only by those who enable them.
"""

from .base import Exporter

__all__ = ["Exporter"]
