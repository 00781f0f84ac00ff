"""GET /metrics as data: the Prometheus text exposition parsed into {sample name: [samples]}."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Sample:
    labels: dict[str, str]
    value: float


class Metrics(dict[str, list[Sample]]):
    """Sample name (`attnserve_generation_tokens_total`, `..._seconds_bucket`, ...) -> its samples."""

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels` (0.0 when there are none), e.g.
        `m.value("attnserve_request_success_total", finished_reason="stop")`."""
        return sum(s.value for s in self.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


def parse_metrics(text: str) -> Metrics:
    out = Metrics()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(Sample(dict(sample.labels), float(sample.value)))
    return out
