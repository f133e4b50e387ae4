"""Reading /metrics in tests: one parser (prometheus_client's), one lookup."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

# what a family's samples add to its name (counters, histograms, summaries)
SAMPLE_SUFFIXES = ("", "_total", "_count", "_sum", "_bucket", "_created")


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a /metrics page by name and label set."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of sample `name` over the label sets that include `labels`. A counter or
    histogram that no traffic has reached yet (declared, no such sample) counts 0; a gauge
    must have the sample, and a name the page does not declare is an error, so a renamed or
    vanished metric cannot pass as zero."""
    families = list(text_string_to_metric_families(text))
    found = [s.value for family in families for s in family.samples
             if s.name == name and labels.items() <= s.labels.items()]
    not_yet_counted = any(family.type != "gauge" and name == family.name + suffix
                          for family in families for suffix in SAMPLE_SUFFIXES)
    assert found or not_yet_counted, f"{name}{labels or ''} is not in /metrics"
    return sum(found)
