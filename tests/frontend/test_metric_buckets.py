"""The frontend's histogram buckets and label values follow Dynamo's (``dynamo_metric_facts.yaml``)."""

from __future__ import annotations

from pathlib import Path

import yaml

from dynamo_lite.frontend import metrics
from dynamo_lite.frontend.metrics import error_type, log_buckets

FACTS = Path(metrics.__file__).with_name("dynamo_metric_facts.yaml")


def test_log_buckets_have_dynamos_shape():
    # Dynamo's own tests of generate_log_buckets: count values, 0 first, the max last, increasing.
    b = log_buckets(1.0, 100.0, 5)
    assert len(b) == 5 and b[0] == 0.0 and b[-1] == 100.0 and list(b) == sorted(set(b))
    assert log_buckets(1.0, 100.0, 2) == (0.0, 100.0) and log_buckets(1.0, 100.0, 1) == (0.0,)
    assert all(float(f"{v:.2g}") == v for v in log_buckets(0.001, 480.0, 18))


def test_buckets_and_label_values_are_the_recorded_ones():
    facts = yaml.safe_load(FACTS.read_text())
    m = metrics.FrontendMetrics()
    by_name = {
        "time_to_first_token_seconds": m.ttft,
        "request_duration_seconds": m.duration,
        "input_sequence_tokens": m.input_sequence,
        "output_sequence_tokens": m.output_sequence,
    }
    for name, (low, high, count) in facts["buckets"].items():
        if name in by_name:
            assert tuple(by_name[name]._upper_bounds[:-1]) == log_buckets(low, high, count), name
    values = facts["label_values"]
    assert set(metrics.ENDPOINT_LABEL.values()) == set(values["endpoint"])
    assert {error_type(s) for s in (200, 400, 404, 422, 429, 499, 500, 501, 503)} == set(values["error_type"])
