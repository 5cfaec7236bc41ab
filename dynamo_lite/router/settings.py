"""Every knob of the router, with its default, in one place: placement's (shared with decode_first workers)
and the disaggregation's own."""

from __future__ import annotations

from dataclasses import dataclass

from dynamo_lite.placement.settings import PlacementSettings


@dataclass(slots=True)
class RouterSettings(PlacementSettings):
    """How the router places and disaggregates requests (the frontend's ``--router-mode``,
    ``--disagg-threshold``, ... flags)."""

    # Prompts shorter than this skip the prefill worker (0: always disaggregate; negative: never — decode
    # workers prefill every prompt, and no prefill worker is needed).
    disagg_threshold: int = 0
    migration_limit: int = 0  # times a request may move to another worker when its worker dies mid-stream
