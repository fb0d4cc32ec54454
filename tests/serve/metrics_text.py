"""Read samples out of the Prometheus text format."""

from __future__ import annotations

import httpx2
from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str) -> dict[str, float]:
    """{'name{label="value"}': value} for every sample (labels sorted), or just 'name' without labels."""
    text = httpx2.get(f"{url}/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def finished(samples: dict[str, float], reason: str) -> float:
    return samples.get(f'slimserve_request_success_total{{finish_reason="{reason}"}}', 0.0)


def histogram_delta(before: dict[str, float], after: dict[str, float], name: str) -> dict[str, float]:
    """Count, mean and the bucket bound under which 99% fell, for the observations between two scrapes."""
    count = after[f"{name}_count"] - before[f"{name}_count"]
    total = after[f"{name}_sum"] - before[f"{name}_sum"]
    prefix = f'{name}_bucket{{le="'
    buckets = sorted((float(key[len(prefix) : -2]), key) for key in after if key.startswith(prefix))
    p99 = next(bound for bound, key in buckets if after[key] - before.get(key, 0.0) >= 0.99 * count)
    return {"count": count, "mean_ms": 1e3 * total / count if count else 0.0, "p99_under_ms": 1e3 * p99}
