"""The per-model preprocessor is built once per model, not once per instance's card.

Every worker publishes its own card; which one the router offers changes as instances come and go (a prefill
worker killed, a decode worker's card now first). Those cards differ only in ``role``: rebuilding the tokenizer
on such a flip stalled requests and grew the frontend's RSS by ~45 MB each time (the chaos benchmark's
unexplained growth, issue 26).
"""

from __future__ import annotations

import msgspec

from dynamo_lite.frontend.preprocess import PreprocessorCache, same_preprocessing
from dynamo_lite.protocol import ModelCard, Role


async def test_role_flip_keeps_the_preprocessor(card: ModelCard) -> None:
    cache = PreprocessorCache()
    prefill = msgspec.structs.replace(card, role=Role.PREFILL)
    decode = msgspec.structs.replace(card, role=Role.DECODE)
    first = await cache.get(prefill)
    assert await cache.get(decode) is first
    assert await cache.get(prefill) is first
    assert first.card is prefill  # adopted, so the next request with this card object takes the ``is`` test


async def test_a_changed_card_rebuilds(card: ModelCard) -> None:
    cache = PreprocessorCache()
    first = await cache.get(card)
    changed = msgspec.structs.replace(card, role=Role.DECODE, context_length=card.context_length // 2)
    assert not same_preprocessing(card, changed)
    second = await cache.get(changed)
    assert second is not first and second.card is changed
