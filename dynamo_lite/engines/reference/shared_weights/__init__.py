"""One copy of the model's weights per device, mapped by every worker on it (``--shared-weights SOCKET``).

A prefill and a decode worker on one GPU would otherwise each load the model: 2 x ~65 GB for gpt-oss-120b leaves
no room for KV even on an H200. Here a small holder process (``holder``) loads the weights once and serves their
description on a local Unix socket (``wire``: msgspec, never pickle); each worker maps them (``client``: CUDA IPC
on a GPU, one ``/dev/shm`` file on a CPU, ``storage``) and rebuilds the same weights tree (``tree``). The CPU form
exists so that the sharing, a worker's restart-and-remap and the holder's death are tested in CI without a GPU.

    python -m dynamo_lite.engines.reference.shared_weights --socket /run/dynamo/gpu0.sock \\
        --model-path openai/gpt-oss-120b --device cuda:0 --dtype bfloat16 --quantization mxfp4 &
    python -m dynamo_lite.worker --engine torch --mode prefill --shared-weights /run/dynamo/gpu0.sock ...
    python -m dynamo_lite.worker --engine torch --mode decode --shared-weights /run/dynamo/gpu0.sock ...

``launch/gpt_oss_shared_weights.sh`` starts this topology; ``docs/shared_weights.md`` describes it.
"""

from dynamo_lite.engines.reference.shared_weights.client import (
    HOLDER_LOST_EXIT,
    AttachedWeights,
    SharedWeightsError,
    attach,
    exit_on_owner_loss,
)
from dynamo_lite.engines.reference.shared_weights.holder import WeightsHolder, weights_fingerprint

__all__ = [
    "HOLDER_LOST_EXIT",
    "AttachedWeights",
    "SharedWeightsError",
    "WeightsHolder",
    "attach",
    "exit_on_owner_loss",
    "weights_fingerprint",
]
