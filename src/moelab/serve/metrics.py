"""Prometheus metrics of one server, in its own `CollectorRegistry` (several apps, e.g. in
tests, never share a global registry).

Latencies are measured on the HTTP side, as the client sees them (from the request's
arrival): ``moelab_serve_time_to_first_token_seconds``,
``moelab_serve_inter_token_latency_seconds`` (one observation per generated token: the gap
between two engine events divided by the tokens the later one brought) and
``moelab_serve_e2e_request_latency_seconds``. Rejections (400/429/503) are counted in
``moelab_serve_requests_rejected_total{reason}``.

Everything else is read from `Engine.stats()` at scrape time (`EngineCollector`), so the
numbers are the engine's own: ``moelab_serve_requests_running`` / ``_waiting`` / ``_slots``,
``moelab_serve_engine_steps_total``, ``moelab_serve_prompt_tokens_total``,
``moelab_serve_generation_tokens_total``, ``moelab_serve_requests_finished_total{finish_reason}``
and the expert load of the served traffic: ``moelab_serve_expert_tokens_total{layer,expert}``
(tokens routed to each expert, every one of a token's top-k experts counted) and
``moelab_serve_expert_busiest_share{layer}``, the busiest expert's share of the layer's
routed tokens (1/E when perfectly balanced, 1 when one expert takes everything).

A model served with offloaded experts (``moelab serve --expert-memory``) also shows its
expert cache (`OffloadCollector`, from `moelab.offload.ExpertStore.stats()`):
``moelab_serve_offload_hits_total`` / ``_misses_total`` / ``_evictions_total``,
``moelab_serve_offload_read_bytes_total``, ``moelab_serve_offload_stall_seconds_total``
(time the forward waited for reads) and ``moelab_serve_offload_resident_bytes``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class EngineCollector:
    """Gauges and counters taken from ``engine.stats()`` when scraped."""

    def __init__(self, engine):
        self.engine = engine

    def describe(self):
        return []  # no collect() at registration: the engine may not be running yet

    def collect(self):
        s = self.engine.stats()
        for name, value, doc in (
            ("moelab_serve_requests_running", s.running, "requests holding a slot"),
            ("moelab_serve_requests_waiting", s.waiting, "requests queued for a slot"),
            ("moelab_serve_slots", s.slots, "slots (max concurrent requests)"),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        for name, value, doc in (
            ("moelab_serve_engine_steps", s.steps, "engine steps run"),
            ("moelab_serve_prompt_tokens", s.prompt_tokens, "prompt tokens prefilled"),
            ("moelab_serve_generation_tokens", s.generation_tokens, "tokens generated"),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        finished = CounterMetricFamily(
            "moelab_serve_requests_finished", "requests ended, by engine finish reason", labels=["finish_reason"])
        for reason, n in sorted(s.finished.items()):
            finished.add_metric([reason], n)
        yield finished
        tokens = CounterMetricFamily(
            "moelab_serve_expert_tokens", "served tokens routed to each expert (all top-k choices)",
            labels=["layer", "expert"])
        busiest = GaugeMetricFamily(
            "moelab_serve_expert_busiest_share", "the busiest expert's share of a layer's routed tokens",
            labels=["layer"])
        for layer, counts in sorted(s.expert_tokens.items()):
            for e, n in enumerate(counts):
                tokens.add_metric([str(layer), str(e)], n)
            total = sum(counts)
            if total:
                busiest.add_metric([str(layer)], max(counts) / total)
        yield tokens
        yield busiest


class OffloadCollector:
    """The expert cache of an offloaded model, read from ``store.stats()`` when scraped."""

    def __init__(self, store):
        self.store = store

    def describe(self):
        return []

    def collect(self):
        s = self.store.stats()
        for name, value, doc in (
            ("moelab_serve_offload_hits", s.hits, "expert requests served from the cache"),
            ("moelab_serve_offload_misses", s.misses, "expert requests read from the checkpoint"),
            ("moelab_serve_offload_evictions", s.evictions, "experts evicted from the cache"),
            ("moelab_serve_offload_read_bytes", s.bytes_read, "bytes read from the checkpoint"),
            ("moelab_serve_offload_stall_seconds", s.stall_s, "time the forward waited for expert reads"),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily("moelab_serve_offload_resident_bytes", "expert bytes resident now",
                                value=s.resident_bytes)


class ServerMetrics:
    """The registry of one app and the latency histograms the HTTP layer observes."""

    def __init__(self, engine, offload_store=None):
        self.registry = CollectorRegistry()
        self.ttft = Histogram(
            "moelab_serve_time_to_first_token_seconds", "request arrival to its first generated token",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram(
            "moelab_serve_inter_token_latency_seconds", "time between generated tokens of a request",
            buckets=_TOKEN_BUCKETS, registry=self.registry)
        self.e2e = Histogram(
            "moelab_serve_e2e_request_latency_seconds", "request arrival to its last token",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.rejected = Counter(
            "moelab_serve_requests_rejected", "requests refused before reaching the engine",
            labelnames=["reason"], registry=self.registry)
        self.registry.register(EngineCollector(engine))
        if offload_store is not None:
            self.registry.register(OffloadCollector(offload_store))

    def render(self) -> bytes:
        return generate_latest(self.registry)
