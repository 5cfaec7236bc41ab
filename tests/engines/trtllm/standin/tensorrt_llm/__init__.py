"""STAND-IN for TensorRT-LLM — NOT TensorRT-LLM. For dynamo_lite's tests only.

TensorRT-LLM needs an NVIDIA GPU and cannot be installed on the machines that run the tests, so this package
implements the documented surface of ``tensorrt_llm`` that ``dynamo_lite.engines.trtllm`` calls, with a
deterministic fake model instead of a GPU:

- ``LLM(model=folder, **args)`` checks its arguments like TensorRT-LLM (unknown keys and bad config sections
  are refused), reads ``vocab_size``/``eos_token_id`` from the folder's ``config.json``, and ``shutdown()``s;
- ``LLM.generate_async(token_ids, sampling_params, disaggregated_params=..., streaming=...)`` returns a
  ``RequestOutput``: async-iterable (cumulative ``outputs[0].token_ids``, several tokens per output with
  ``stream_interval``), awaitable, ``finished``, ``outputs[0].finish_reason``, ``abort()``;
- a ``context_only`` request yields exactly one token and ``DisaggregatedParams`` with ``ctx_request_id``
  and an ``opaque_state`` (bytes) bound to the prompt and first token; a ``generation_only`` request must be
  given the matching ``opaque_state`` (bytes), ``ctx_request_id`` and ``first_gen_tokens``, on the same
  prompt, or it fails with ``RequestError``; its output starts with the first token, as TensorRT-LLM's does.

Put ``tests/engines/trtllm/standin`` on ``PYTHONPATH`` (or ``sys.path``) to make ``import tensorrt_llm`` find
it. Knobs for tests (environment variables, read when ``LLM`` is built, so they reach worker processes too):
``TRTLLM_STANDIN_STEP_DELAY_S`` (seconds per generated token, default 0) and ``TRTLLM_STANDIN_EOS_AFTER``
(the N-th generated token is EOS, default never).
"""

from tensorrt_llm.disaggregated_params import DisaggregatedParams
from tensorrt_llm.llmapi import LLM, CompletionOutput, RequestError, RequestOutput
from tensorrt_llm.sampling_params import SamplingParams

IS_STANDIN = True
__version__ = "1.2.0+dynamo-lite-standin"  # the API surface it stands in for: the 1.2 line

__all__ = [
    "LLM",
    "CompletionOutput",
    "DisaggregatedParams",
    "IS_STANDIN",
    "RequestError",
    "RequestOutput",
    "SamplingParams",
]
