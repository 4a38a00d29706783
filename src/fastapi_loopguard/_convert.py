"""What crosses the binding, both ways: the documented options into the engine's native configs,
and the engine's stats into the documented ``LoopGuard.stats()`` dict (the binding itself only
converts types, field by field)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from .config import LoopGuardConfig
from .frames import frame_config

if TYPE_CHECKING:
    from ._core import EngineStats, SamplerConfig, ThresholdConfig, WatchdogConfig

_NS_PER_MS = 1_000_000


def engine_configs(
    core: Any, cfg: LoopGuardConfig
) -> tuple[WatchdogConfig, ThresholdConfig, SamplerConfig]:
    """The engine's (watchdog, threshold, sampler) configs for ``cfg``. Call on the loop thread:
    the sampler learns whether the loop runs on the main thread."""
    watchdog = core.WatchdogConfig()
    watchdog.interval_ns = int(cfg.monitor_interval_ms * _NS_PER_MS)
    watchdog.capture_stacks = cfg.capture_stacks
    watchdog.hang_threshold_ns = int(cfg.hang_threshold_ms * _NS_PER_MS)
    cumulative = core.CumulativeConfig()
    cumulative.enabled = cfg.cumulative_blocking_enabled
    cumulative.threshold_ns = int(cfg.cumulative_blocking_threshold_ms * _NS_PER_MS)
    cumulative.window_ns = int(cfg.cumulative_window_ms * _NS_PER_MS)
    watchdog.cumulative = cumulative
    threshold = core.ThresholdConfig()
    threshold.multiplier = float(cfg.threshold_multiplier)
    threshold.fallback_ns = int(cfg.fallback_threshold_ms * _NS_PER_MS)
    threshold.adaptive = cfg.adaptive_threshold
    threshold.window = cfg.adaptive_window_size
    threshold.percentile = float(cfg.adaptive_percentile)
    threshold.min_samples = cfg.adaptive_min_samples
    threshold.update_interval_ns = int(cfg.adaptive_update_interval_ms * _NS_PER_MS)
    sampler = core.SamplerConfig()
    sampler.frames = frame_config(core)
    sampler.loop_is_main_thread = threading.current_thread() is threading.main_thread()
    return watchdog, threshold, sampler


def stats_dict(s: EngineStats) -> dict[str, float | int]:
    """The engine's stats as ``LoopGuard.stats()`` documents them: milliseconds, microseconds."""
    ms = _NS_PER_MS
    return {
        "threshold_ms": s.threshold_ns / ms,
        "baseline_ms": s.baseline_ns / ms,
        "lag_count": s.lag_count,
        "lag_p50_ms": s.lag_p50_ns / ms,
        "lag_p90_ms": s.lag_p90_ns / ms,
        "lag_p99_ms": s.lag_p99_ns / ms,
        "lag_max_ms": s.lag_max_ns / ms,
        "stalls": s.stalls,
        "events_emitted": s.events_emitted,
        "events_dropped": s.events_dropped,
        "events_detected": s.events_detected,
        "samples": s.samples,
        "stack_timeouts": s.stack_timeouts,
        "late_stacks": s.late_stacks,
        "unlocked_stacks": s.unlocked_stacks,
        "cumulative_events": s.cumulative_events,
        "hangs": s.hangs,
        "saturation_ms": s.saturated_ns / ms,
        "sample_pause_count": s.pause_count,
        "sample_pause_p50_us": s.pause_p50_ns / 1000,
        "sample_pause_p99_us": s.pause_p99_ns / 1000,
        "sample_pause_max_us": s.pause_max_ns / 1000,
        "inflight": s.inflight,
    }


__all__ = ["engine_configs", "stats_dict"]
