"""The planner: sizes the prefill and decode pools to hold TTFT and ITL targets as load changes.

One interval of the run loop (``python -m dynamo_lite.planner``) reads top to bottom through these modules:

- ``scrape``: the frontend's and workers' ``/metrics`` → one ``Observation`` of the last interval
  (request rate, ISL/OSL, TTFT/ITL p90, queues, KV use).
- ``predict``: the recent observations → the next interval's load (``LoadForecast``).
- ``profile``: what one worker can do (prefill time vs ISL, decode ITL vs concurrency and context);
  ``python -m dynamo_lite.planner profile`` writes it.
- ``decide``: forecast + profile + targets → replica counts, within bounds and budget, with cool-down and the
  reasons for every change (``Decision``); pure code, no I/O.
- ``connectors``: apply a decision — local worker processes, Kubernetes Deployments, or dry-run.
- ``metrics``: the planner's own Prometheus metrics.
"""
