"""Summaries of a serving benchmark: throughput, latency percentiles and goodput from per-request timings."""

from __future__ import annotations

from dataclasses import dataclass, field

from slimserve.errors import SlimserveError

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    prompt_len: int
    success: bool = False
    error: str = ""
    output_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    # Gaps between consecutive chunks that carried text.
    itl_s: list[float] = field(default_factory=list)

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    values = sorted(values)
    pos = (len(values) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (pos - low)


def distribution_ms(values_s: list[float]) -> dict[str, float]:
    values = [1e3 * v for v in values_s]
    out = {"mean": sum(values) / len(values) if values else float("nan"), "median": percentile(values, 50)}
    out.update({f"p{q}": percentile(values, q) for q in PERCENTILES if q != 50})
    return out


def parse_slos(spec: list[str] | None) -> dict[str, float]:
    """["ttft:200", "tpot:50"] -> {"ttft": 0.2, "tpot": 0.05} (milliseconds in, seconds out)."""
    slos = {}
    for item in spec or []:
        name, _, value = item.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not value:
            raise SlimserveError(f"a goodput SLO is ttft:MS, tpot:MS or e2el:MS, got {item!r}")
        slos[name] = float(value) / 1e3
    return slos


def meets(result: RequestResult, slos: dict[str, float]) -> bool:
    observed = {"ttft": result.ttft_s, "tpot": result.tpot_s or 0.0, "e2el": result.e2e_s}
    return result.success and all(observed[name] <= limit for name, limit in slos.items())


def summarize(results: list[RequestResult], duration_s: float, slos: dict[str, float]) -> dict:
    ok = [r for r in results if r.success]
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    summary = {
        "duration_s": duration_s,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "ttft_ms": distribution_ms([r.ttft_s for r in ok]),
        "tpot_ms": distribution_ms([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_ms": distribution_ms([gap for r in ok for gap in r.itl_s]),
        "e2el_ms": distribution_ms([r.e2e_s for r in ok]),
        "errors": sorted({r.error for r in results if r.error})[:10],
    }
    if slos:
        summary["goodput_slos_ms"] = {name: 1e3 * limit for name, limit in slos.items()}
        summary["request_goodput"] = sum(meets(r, slos) for r in results) / duration_s
    return summary


def format_table(summary: dict) -> str:
    lines = [
        f"{'Successful requests:':<40}{summary['completed']:>12}",
        f"{'Failed requests:':<40}{summary['failed']:>12}",
        f"{'Benchmark duration (s):':<40}{summary['duration_s']:>12.2f}",
        f"{'Total input tokens:':<40}{summary['total_input_tokens']:>12}",
        f"{'Total generated tokens:':<40}{summary['total_output_tokens']:>12}",
        f"{'Request throughput (req/s):':<40}{summary['request_throughput']:>12.2f}",
        f"{'Output token throughput (tok/s):':<40}{summary['output_throughput']:>12.2f}",
        f"{'Total token throughput (tok/s):':<40}{summary['total_token_throughput']:>12.2f}",
    ]
    if "request_goodput" in summary:
        lines.append(f"{'Request goodput (req/s):':<40}{summary['request_goodput']:>12.2f}")
    for key, title in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E latency")):
        lines.append(f"{'-' * 20} {title} (ms) {'-' * (30 - len(title))}")
        for stat, value in summary[key].items():
            lines.append(f"{stat.capitalize() + ':':<40}{value:>12.2f}")
    return "\n".join(lines)
