"""``Placement``: policies, load view, KV index, admission and the prefill handoff, assembled once."""

from __future__ import annotations

from collections.abc import Collection

from dynamo_lite.placement.admission import Admission
from dynamo_lite.placement.handoff import PrefillHandoff
from dynamo_lite.placement.kv_index import KvIndex
from dynamo_lite.placement.load import LoadTracker
from dynamo_lite.placement.policies import Policy, make_policy
from dynamo_lite.placement.settings import PlacementSettings
from dynamo_lite.protocol import RequestPlane, Role
from dynamo_lite.runtime.registry import LiveView


class Placement:
    """Places requests of ``roles`` on the instances of ``view`` as ``settings`` say, and runs the prefill
    handoff over ``plane``. ``start`` subscribes to the workers' load reports (and, in kv mode, KV events) in
    ``namespace``; ``stop`` ends the subscriptions.

    >>> placement = Placement(view, plane, "dynamo", PlacementSettings(policy="least-loaded"))  # doctest: +SKIP
    >>> await placement.start()  # doctest: +SKIP
    >>> instance = await placement.admission.place(Role.PREFILL, model, request)  # doctest: +SKIP
    """

    def __init__(
        self,
        view: LiveView,
        plane: RequestPlane,
        namespace: str,
        settings: PlacementSettings,
        roles: Collection[Role] = (Role.PREFILL, Role.DECODE, Role.AGGREGATED),
    ) -> None:
        self.view = view
        self.plane = plane
        self.namespace = namespace
        self.settings = settings
        self.load = LoadTracker(settings.load_report_ttl_s)
        self.kv_index = KvIndex(settings.kv_approx_ttl_s)
        # kv mode: the prefill (or aggregated) pick follows the cache; the decode pick follows load.
        decode_policy = "least-loaded" if settings.policy == "kv" else settings.policy
        policies: dict[Role, Policy] = {
            role: make_policy(
                decode_policy if role == Role.DECODE else settings.policy,
                self.load,
                self.kv_index,
                settings.kv_block_size,
                settings.kv_load_weight,
            )
            for role in roles
        }
        self.admission = Admission(
            view,
            self.load,
            policies,
            queue_depth=settings.queue_depth,
            queue_timeout_s=settings.timeouts.queue_s,
            worker_return_s=settings.timeouts.worker_return_s,
            retry_after_s=settings.timeouts.retry_after_s,
            plane=plane,
        )
        self.load.on_report = self.admission.instance_reported
        view.on_change.append(self.admission.instances_changed)
        self.handoff = PrefillHandoff(
            plane,
            self.admission,
            first_token_s=settings.timeouts.first_token_s,
            prefill_retries=settings.prefill_retries,
        )
        self._subscribed = False

    @property
    def kv_mode(self) -> bool:
        return self.settings.policy == "kv"

    async def start(self) -> None:
        """Subscribe to worker load reports (room for queued requests, least-loaded and kv policies) and, in kv
        mode, to KV cache events."""
        if self._subscribed:
            return
        await self.load.start(self.plane, self.namespace)
        if self.kv_mode:
            await self.kv_index.start(self.plane, self.namespace)
        self.view.on_change.append(self._forget_gone_instances)
        self._subscribed = True

    async def stop(self) -> None:
        if not self._subscribed:
            return
        self._subscribed = False
        await self.load.stop()
        if self.kv_mode:
            await self.kv_index.stop()
        self.view.on_change.remove(self._forget_gone_instances)

    def _forget_gone_instances(self) -> None:
        self.load.forget_gone(self.view.instances)
        for iid in self.kv_index.instances():
            if iid not in self.view.instances:
                self.kv_index.remove_instance(iid)
