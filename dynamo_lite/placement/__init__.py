"""Placement: which instance serves a request, and the prefill → decode handoff. The frontend's router and
decode_first workers share it; neither owns it.

- ``policies``: pick one instance of a role (round-robin, random, least-loaded, kv)
- ``load``: worker load reports (fresh ones only) plus this process's own in-flight counts
- ``kv_index``: which instance holds which prompt blocks (kv mode)
- ``admission``: reserve an instance with room, or wait for one in a bounded queue per model
- ``handoff``: the prefill on a prefill worker, its KV handed to the decode side
- ``settings``: every default of the above (``PlacementSettings``)

``Placement`` assembles them, and its ``start`` subscribes to the workers' load reports (and KV events in kv
mode), so every process that places requests sees load the same way.
"""

from dynamo_lite.placement.placement import Placement
from dynamo_lite.placement.settings import PlacementSettings

__all__ = ["Placement", "PlacementSettings"]
