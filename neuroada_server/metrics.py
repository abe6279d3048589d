"""Prometheus metrics, in a registry of their own per server (tests run several in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_SWITCH_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.5)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "neuroada_requests", "Generation requests by adapter and status", ["adapter", "status"], registry=r
        )
        self.queue_depth = Gauge("neuroada_queue_depth", "Requests waiting for a batch", registry=r)
        self.ttft = Histogram(
            "neuroada_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "neuroada_request_latency_seconds", "End-to-end request latency", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tokens = Counter("neuroada_generated_tokens", "Generated tokens", ["adapter"], registry=r)
        self.steps = Counter(
            "neuroada_steps",
            "Forward calls (prefills and decode steps) by path: merged (one adapter applied in place) or mixed",
            ["path"],
            registry=r,
        )
        # A batch whose forward raised is split and run again in halves until the failing request is
        # alone; a bug that fails whole batches shows here before anywhere else.
        self.split_batches = Counter(
            "neuroada_split_batches",
            "Prefills and decode steps that raised and were run again in halves, by stage",
            ["stage"],
            registry=r,
        )
        self.compiled_steps = Counter(
            "neuroada_compiled_decode_steps",
            "Decode steps run as a compiled graph (--compile-decode), by path (merged or mixed)",
            ["path"],
            registry=r,
        )
        self.decode_compile_seconds = Gauge(
            "neuroada_decode_compile_seconds", "Time compiling the decode step's buckets at start-up", registry=r
        )
        # vLLM's vllm:prefix_cache_queries / vllm:prefix_cache_hits: the hit rate is hits / queries.
        self.prefix_cache_queries = Counter(
            "neuroada_prefix_cache_queries",
            "Prompt tokens of finished requests, looked up in the prefix cache",
            registry=r,
        )
        self.prefix_cache_hits = Counter(
            "neuroada_prefix_cache_hits", "Prompt tokens of finished requests found in the prefix cache", registry=r
        )
        self.prefix_cache_bytes = Gauge("neuroada_prefix_cache_bytes", "Bytes held by the prefix cache", registry=r)
        self.running = Gauge("neuroada_running_requests", "Requests in the running batch", registry=r)
        self.switches = Counter("neuroada_adapter_switches", "Adapter switches (restore + apply)", registry=r)
        self.switch_seconds = Histogram(
            "neuroada_adapter_switch_seconds", "Adapter switch latency", buckets=_SWITCH_BUCKETS, registry=r
        )
        self.adapters = Gauge(
            "neuroada_adapters",
            "Adapters per tier: resident (device), host (validated, in RAM), disk",
            ["tier"],
            registry=r,
        )
        self.adapter_bytes = Gauge(
            "neuroada_adapter_bytes", "Bytes held by the adapters of each tier", ["tier"], registry=r
        )
        self.adapter_loads = Counter(
            "neuroada_adapter_loads",
            "Adapters brought into a tier: host (file read), resident (placed)",
            ["tier"],
            registry=r,
        )
        self.adapter_evictions = Counter(
            "neuroada_adapter_evictions", "Adapters evicted from a tier for room", ["tier"], registry=r
        )
        self.adapter_load_seconds = Histogram(
            "neuroada_adapter_load_seconds",
            "Time to make an adapter resident (reading, validating and placing it)",
            buckets=_SWITCH_BUCKETS[4:] + (1, 2.5, 10),
            registry=r,
        )
        self.adapter_scan_seconds = Gauge(
            "neuroada_adapter_scan_seconds", "Time to list the adapter store at start-up (headers only)", registry=r
        )
        self.adapter_lookups = Counter(
            "neuroada_adapter_lookups", "Adapter requests by whether the adapter was resident", ["result"], registry=r
        )
        # vLLM's vllm:lora_requests_info, read by LoRA-aware routers (the Gateway API inference
        # extension, llm-d): the value is a timestamp, the labels carry the state.
        self.lora_requests_info = Gauge(
            "neuroada_lora_requests_info",
            "Running and waiting adapters (comma-separated) and the most that can be resident",
            ["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
            registry=r,
        )
        self.device_memory = Gauge("neuroada_device_memory_bytes", "Device memory allocated (CUDA only)", registry=r)
        self.uploads = Counter("neuroada_adapter_uploads", "Adapter uploads by result", ["result"], registry=r)
        self.structured_requests = Counter(
            "neuroada_structured_requests",
            "Requests held to a structure, by kind (json_schema, json_object, regex, choice, grammar)",
            ["kind"],
            registry=r,
        )
        self.structure_compile_seconds = Histogram(
            "neuroada_structure_compile_seconds",
            "Time compiling a request's structure (one compiled before comes from the cache)",
            buckets=_SWITCH_BUCKETS[4:] + (1, 2.5, 10),
            registry=r,
        )

    def forget_adapter(self, name: str) -> None:
        """Remove a deleted adapter's label series, so the label set stays the adapters served."""
        for counter, labels in ((self.requests, ("adapter", "status")), (self.tokens, ("adapter",))):
            series = {
                tuple(sample.labels[label] for label in labels)
                for metric in counter.collect()
                for sample in metric.samples
                if sample.labels.get("adapter") == name
            }
            for values in series:
                counter.remove(*values)
