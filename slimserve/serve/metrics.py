"""Prometheus metrics of one server, in a registry of its own (two apps in one process never mix)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from slimserve.serve.engine_messages import EngineStats

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0)
STEP_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


class _EngineStatsCollector(Collector):
    """Gauges read from the engine's latest report at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        yield GaugeMetricFamily("slimserve_num_requests_running", "Requests in the running batch.", s.num_running)
        yield GaugeMetricFamily("slimserve_num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        usage = 1.0 - s.num_free_blocks / s.num_blocks
        yield GaugeMetricFamily("slimserve_kv_cache_usage_perc", "Fraction of KV-cache blocks in use.", usage)
        yield GaugeMetricFamily("slimserve_kv_cache_free_blocks", "Free KV-cache blocks.", s.num_free_blocks)
        yield GaugeMetricFamily("slimserve_kv_cache_blocks", "KV-cache blocks in all.", s.num_blocks)
        yield CounterMetricFamily("slimserve_prefix_cache_queries", "Full prompt blocks looked up.", s.prefix_queries)
        yield CounterMetricFamily("slimserve_prefix_cache_hits", "Prompt blocks found cached.", s.prefix_hits)
        rate = s.prefix_hits / s.prefix_queries if s.prefix_queries else 0.0
        yield GaugeMetricFamily("slimserve_prefix_cache_hit_rate", "Prefix-cache hits over queries.", rate)
        yield CounterMetricFamily("slimserve_num_preemptions", "Sequences preempted.", s.num_preemptions)
        yield CounterMetricFamily("slimserve_engine_steps", "Engine steps run.", s.num_steps)
        yield GaugeMetricFamily(
            "slimserve_engine_step_gap_max_seconds", "Longest pause between two busy engine steps.", s.max_step_gap_s
        )
        yield CounterMetricFamily("slimserve_spec_decode_num_drafts", "Verifications with drafts.", s.spec_num_drafts)
        yield CounterMetricFamily(
            "slimserve_spec_decode_num_draft_tokens", "Draft tokens proposed.", s.spec_draft_tokens
        )
        yield CounterMetricFamily(
            "slimserve_spec_decode_num_accepted_tokens", "Draft tokens accepted.", s.spec_accepted_tokens
        )
        rate = s.spec_accepted_tokens / s.spec_draft_tokens if s.spec_draft_tokens else 0.0
        yield GaugeMetricFamily("slimserve_spec_decode_acceptance_rate", "Accepted over drafted tokens.", rate)
        length = 1 + s.spec_accepted_tokens / s.spec_num_drafts if s.spec_num_drafts else 0.0
        yield GaugeMetricFamily(
            "slimserve_spec_decode_mean_accepted_length", "Tokens per verification (accepted + 1).", length
        )


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "slimserve_http_requests", "HTTP requests by route and status.", ["route", "status"], registry=r
        )
        self.finished = Counter(
            "slimserve_request_success", "Engine requests finished, by reason.", ["finish_reason"], registry=r
        )
        self.prompt_tokens = Counter("slimserve_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("slimserve_generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram(
            "slimserve_time_to_first_token_seconds", "Arrival to first token.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "slimserve_time_per_output_token_seconds",
            "Per request: time from the first to the last token over the tokens after the first.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "slimserve_e2e_request_latency_seconds", "Arrival to last token.", buckets=E2E_BUCKETS, registry=r
        )
        self.step = Histogram("slimserve_engine_step_seconds", "One engine step.", buckets=STEP_BUCKETS, registry=r)
        self.step_gap = Histogram(
            "slimserve_engine_step_gap_seconds",
            "Pause between two engine steps while requests are unfinished.",
            buckets=STEP_BUCKETS,
            registry=r,
        )

    def watch_engine(self, stats: Callable[[], EngineStats]) -> None:
        self.registry.register(_EngineStatsCollector(stats))

    def observe_step(self, step_s: float, gap_s: float | None) -> None:
        self.step.observe(step_s)
        if gap_s is not None:
            self.step_gap.observe(gap_s)

    def observe_finish(
        self, reason: str, e2e_s: float | None = None, prompt_tokens: int = 0, output_tokens: int = 0
    ) -> None:
        self.finished.labels(reason).inc()
        if e2e_s is not None:
            self.e2e.observe(e2e_s)
            self.prompt_tokens.inc(prompt_tokens)
            self.generation_tokens.inc(output_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
