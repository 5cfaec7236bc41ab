"""The torch reference engine: one thread runs the step loop; the event loop only queues and streams.
What the thread builds before its first step (model, KV cache, CUDA pool and graphs) is ``startup.py``.

``generate()`` validates a request, pulls its KV if it is a decode-phase request (async, on the event loop),
and hands a ``Sequence`` to the engine thread through a thread-safe queue. The thread admits sequences into
KV-cache slots, runs one forward step over the whole batch (``Scheduler.plan`` decides which tokens), samples,
and pushes tokens into each request's ``TokenStream``. Closing the generator posts an abort, which the thread
handles before its next step: the slot is free again within one step.

Phases: a PREFILL request ends after its first token, its prompt's KV exported into the ``KvExporter``
(one chunk: ``token_ids=[first], kv=<descriptor>`` and no finish reason); a DECODE request imports that KV into
its slot (or recomputes it, per ``kv_failure_policy``) and continues after ``generated_ids``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch

from dynamo_lite.engines.base import EngineError, EngineStats, StreamPacing, TokenStream
from dynamo_lite.engines.reasoning import answer_so_far
from dynamo_lite.engines.reference.config import ConfigError, ReferenceConfig
from dynamo_lite.engines.reference.cores import BORROW_MIN_TOKENS, PROCESS_ENGINES, ActivityLease
from dynamo_lite.engines.reference.cuda_graphs import DecodeGraphs
from dynamo_lite.engines.reference.gpt_oss_model import GptOssModel
from dynamo_lite.engines.reference.grammar import GrammarCompiler, GrammarError, mask_rows
from dynamo_lite.engines.reference.kv_cache import KvCache, layer_groups
from dynamo_lite.engines.reference.loader import model_config
from dynamo_lite.engines.reference.logits_processors import (
    apply_penalties,
    pick_logprobs,
    raw_logprobs,
    score_prompts,
)
from dynamo_lite.engines.reference.model import LlamaModel
from dynamo_lite.engines.reference.rank_processes import RankProcesses
from dynamo_lite.engines.reference.rank_runner import RankFailure, Runner
from dynamo_lite.engines.reference.ranks import ParallelError, check_divides
from dynamo_lite.engines.reference.sampling import Sampler, SamplingError, sample_batch, validate
from dynamo_lite.engines.reference.scheduler import (
    Scheduler,
    SeqState,
    Sequence,
    StepPlan,
    stop_reason,
    suppressed_ids,
)
from dynamo_lite.engines.reference.startup import EngineSetup, resolve_quantization
from dynamo_lite.engines.step_threads import StepThreads
from dynamo_lite.engines.tool_args import ToolArgsWatcher
from dynamo_lite.kv import KvCapacityError, KvExporter, KvLayout, KvPullError, pull_kv
from dynamo_lite.kv.cuda_ipc import CudaKvPool
from dynamo_lite.model_files import ModelFiles
from dynamo_lite.protocol import (
    EngineKind,
    FinishReason,
    GenerateChunk,
    GenerateRequest,
    GuidedKind,
    GuidedSpec,
    KvDescriptor,
    Phase,
    Role,
    TokenLogprobs,
)

log = logging.getLogger(__name__)


class TorchEngine:
    """Continuous-batching engine in plain PyTorch (``--engine torch``): llama-family models and gpt-oss."""

    name = EngineKind.TORCH

    def __init__(self, config: ReferenceConfig, model_files: ModelFiles) -> None:
        self.config = config
        self.model_files = model_files
        self.model_config = model_config(model_files.config)
        resolve_quantization(config, model_files, self.model_config)
        self.plan = config.parallel_plan()
        if self.plan.ranked:  # a model whose heads or experts don't divide is refused before anything starts
            try:
                check_divides(self.model_config, self.plan, mxfp4=config.quantization == "mxfp4")
            except ParallelError as e:
                raise ConfigError(str(e)) from e
        # Which layers attend to a sliding window (gpt-oss): their cache is a ring, their KV export the tail.
        _, windowed, window = layer_groups(self.model_config.layer_windows)
        self._kv_windows = (window, tuple(windowed))
        self.device = torch.device(config.device)
        self.dtype: torch.dtype = getattr(torch, config.dtype)
        self.kv_dtype = config.dtype  # of the KV it exports (the cache's)
        self.eos_ids = frozenset(model_files.eos_token_ids)
        self.max_seq_len = min(config.max_seq_len, self.model_config.max_position_embeddings)
        self.exporter: KvExporter | None = None
        self.pacing = StreamPacing()  # the worker's (adapted to the load); by default every step
        self.on_kv_event: Callable[[tuple[int, list[int]]], None] | None = None  # set by the worker
        # Called from the engine thread once the engine has failed for good (a dead rank, a bug): the worker
        # deregisters and exits rather than keep an instance that can only answer 503.
        self.on_failure: Callable[[BaseException], None] | None = None
        self._grammars = GrammarCompiler(
            model_files.tokenizer_json, self.model_config.vocab_size, sorted(self.eos_ids)
        )
        self._kv_config = config.kv_config()
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._model: LlamaModel | GptOssModel | None = None
        self._cache: KvCache | None = None
        self._scheduler: Scheduler | None = None
        self._graphs: DecodeGraphs | None = None
        self._runner: Runner | None = None
        self._ranks: RankProcesses | None = None  # ranks 1..N-1 (rank 0 is this engine thread)
        self._pool: CudaKvPool | None = None
        self._shared: Any = None  # the weights holder's connection (``shared_weights``)
        self._stats = EngineStats()
        self._stats_lock = threading.Lock()  # for counters both the event loop and the engine thread bump
        self._started = False
        self._failure: BaseException | None = None
        # CPU: whether this engine has work, for the process's other engines; and, with ``alone_threads``, the
        # threads its prefill steps take while the others have none (``cores``).
        cpu_alone = self.device.type == "cpu" and not self.plan.ranked
        self._activity: ActivityLease | None = PROCESS_ENGINES.lease() if cpu_alone else None
        self._borrow: StepThreads | None = None
        if cpu_alone and 0 < config.threads < config.alone_threads:
            self._borrow = StepThreads(config.alone_threads, favor_fewer=True)
        self._threads_now = config.threads

    # ---- lifecycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the weights (converting a GGUF once), allocate the KV cache, warm up, start the exporter."""
        if self._started:
            return
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EngineError("device cuda requested but CUDA is not available", status=503)
        if self.device.type == "cuda" and self.device.index is None:
            # "cuda" means the current device; torch.cuda.set_device (the engine thread's) needs its index.
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.config.role == Role.PREFILL:
            self.exporter = KvExporter(self._kv_config, engine_name=self.name)
            await self.exporter.start()
        elif self.plan.ranked and self._kv_config.use_shm:
            from multiprocessing import resource_tracker

            # A ranked import lands TCP bytes in a segment of ours (``pull_kv(shared=True)``): start the tracker
            # that unlinks it if we die now, rather than inside the first pull.
            resource_tracker.ensure_running()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._thread_main, args=(ready,), name="torch-engine")
        self._thread.daemon = True
        self._thread.start()
        try:
            await asyncio.wrap_future(ready)
        except BaseException:
            if self.exporter is not None:
                await self.exporter.stop()
            raise
        self._started = True

    async def stop(self) -> None:
        """Fail what is still running (503), stop the thread, free every exported hold."""
        if self._thread is not None:
            self._inbox.put(("stop", None))
            await asyncio.to_thread(self._thread.join, self.config.stop_timeout_s)
            self._thread = None
        if self.exporter is not None:
            await self.exporter.stop()
        if self._pool is not None:  # after the exporter freed every hold
            if self.exporter is not None:
                self.exporter.use_cuda_pool(None)
            self._pool.close()
            self._pool = None
        if self._shared is not None:  # a clean detach: the holder logs it, our watcher stays quiet
            self._model = self._graphs = None
            self._shared.close()
            self._shared = None
        self._started = False

    def stats(self) -> EngineStats:
        s, sched = self._stats, self._scheduler
        # len() of the scheduler's lists is safe to read from another thread; a sequence leaves ``running``
        # before its stream finishes, so a consumer that saw its end never sees it counted.
        return EngineStats(
            active_seqs=len(sched.running) if sched is not None else 0,
            queued=(len(sched.waiting) if sched is not None else 0) + self._inbox.qsize(),
            kv_bytes_held=self.exporter.held_bytes if self.exporter is not None else 0,
            kv_usage=s.kv_usage,
            last_batch_size=s.last_batch_size,
            total_tokens=s.total_tokens,
            kv_transfers=s.kv_transfers,
            kv_transfer_bytes=s.kv_transfer_bytes,
            kv_transfer_seconds=s.kv_transfer_seconds,
            kv_recomputes=s.kv_recomputes,
        )

    def _count_transfer(self, nbytes: int, seconds: float) -> None:
        with self._stats_lock:
            self._stats.kv_transfers += 1
            self._stats.kv_transfer_bytes += nbytes
            self._stats.kv_transfer_seconds += seconds

    def _count_recompute(self) -> None:
        with self._stats_lock:
            self._stats.kv_recomputes += 1

    # ---- the event loop's side -----------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Stream ``request``'s tokens; a PREFILL request yields exactly one chunk (its first token + KV)."""
        if not self._started or self._failure is not None:
            raise EngineError("engine is not running", status=503, code="engine_not_ready")
        self._validate(request)
        opts = request.sampling
        generated = list(request.generated_ids)
        if len(generated) >= opts.max_tokens:
            yield GenerateChunk(finish_reason=FinishReason.LENGTH)
            return
        stream = TokenStream(asyncio.get_running_loop(), self.pacing)
        seq = Sequence(
            request_id=request.request_id,
            phase=request.phase,
            tokens=[*request.token_ids, *generated],
            prompt_len=len(request.token_ids),
            sampling=opts,
            sampler=Sampler(opts, self.device),
            stream=stream,
            num_generated=len(generated),
        )
        answer = generated
        if opts.reasoning is not None:
            seq.gate, answer = answer_so_far(opts.reasoning, request.token_ids, generated)
        if opts.guided is not None:
            seq.grammar = await self._grammar_state(request, answer)
        if opts.tool_grammars:
            await self._watch_tools(seq, generated)
        submitted = False
        try:
            if request.phase is Phase.DECODE and request.kv is not None:
                seq.pulled, seq.cached_tokens = await self._pull(request, seq)
                stream.set_cached_tokens(seq.cached_tokens)
            self._inbox.put(("add", seq))
            submitted = True
            if request.phase is Phase.PREFILL:
                tokens: list[int] = []
                logprobs: TokenLogprobs | None = None  # the first token's, for the decode side to pass on
                prompt_logprobs: TokenLogprobs | None = None
                async for chunk in stream:
                    tokens.extend(chunk.token_ids)
                    prompt_logprobs = chunk.prompt_logprobs or prompt_logprobs
                    if chunk.logprobs is not None and logprobs is None:
                        logprobs = chunk.logprobs
                    elif chunk.logprobs is not None and logprobs is not None:
                        logprobs.extend(chunk.logprobs)
                    if chunk.kv is not None:  # exported: the handoff, not an end
                        seq.delivered = True
                        yield GenerateChunk(
                            token_ids=tokens, kv=chunk.kv, logprobs=logprobs, prompt_logprobs=prompt_logprobs
                        )
                        return
                    if chunk.finish_reason is not None:
                        yield GenerateChunk(
                            token_ids=tokens,
                            finish_reason=chunk.finish_reason,
                            logprobs=logprobs,
                            prompt_logprobs=prompt_logprobs,
                        )
                        return
            else:
                async for chunk in stream:
                    yield chunk
        finally:
            seq.abandoned = True
            if submitted and seq.state is not SeqState.DONE:
                self._inbox.put(("abort", seq))
            if not submitted and seq.pulled is not None:
                seq.pulled.close()
            if seq.transfer_id and not seq.delivered and self.exporter is not None:
                self.exporter.release(seq.transfer_id)

    def _validate(self, request: GenerateRequest) -> None:
        cfg = self.model_config
        if not request.token_ids:
            raise EngineError("empty prompt", status=400, code="invalid_request")
        total = len(request.token_ids) + len(request.generated_ids)
        if total >= self.max_seq_len:
            raise EngineError(
                f"{total} tokens leave no room to generate within max_seq_len={self.max_seq_len}",
                status=400,
                code="context_length_exceeded",
            )
        ids = [*request.token_ids, *request.generated_ids]
        if min(ids) < 0 or max(ids) >= cfg.vocab_size:
            raise EngineError(f"token ids outside the vocabulary (0..{cfg.vocab_size - 1})", status=400)
        if request.phase is Phase.PREFILL and self.exporter is None:
            raise EngineError("prefill-phase request sent to a worker not in prefill mode", status=400)
        try:
            validate(request.sampling, cfg.vocab_size)
        except SamplingError as e:
            raise EngineError(str(e), status=400, code="invalid_request") from e

    async def _grammar_state(self, request: GenerateRequest, answer: list[int]) -> Any:
        """The request's grammar matcher, past the answer tokens it already has (compiled off the event loop)."""
        opts = request.sampling
        assert opts.guided is not None
        stop_ids = [] if opts.ignore_eos else sorted({*opts.stop_token_ids, *self.eos_ids})
        try:
            return await asyncio.to_thread(self._grammars.state, opts.guided, stop_ids, answer)
        except GrammarError as e:
            raise EngineError(str(e), status=400, code="invalid_request") from e

    async def _watch_tools(self, seq: Sequence, generated: list[int]) -> None:
        """Strict tools: compile their schemas (off the event loop; 400 when one does not compile) and follow
        the tokens already generated."""
        specs = [GuidedSpec(GuidedKind.JSON_SCHEMA, g.schema) for g in seq.sampling.tool_grammars]
        try:
            for spec in specs:
                await asyncio.to_thread(self._grammars.compile, spec)
        except GrammarError as e:
            raise EngineError(f"a strict tool's parameters: {e}", status=400, code="invalid_request") from e
        seq.tools = ToolArgsWatcher(seq.sampling.tool_grammars)
        for token in generated:
            self._follow_tools(seq, token)

    def _follow_tools(self, seq: Sequence, token: int) -> bool:
        """Advance ``seq``'s strict-tool state past ``token``; False when the token breaks the arguments' grammar."""
        if seq.tool_args is not None:
            if not seq.tool_args.accept(token):
                return False
            if seq.tool_args.terminated:
                seq.tool_args = None
            return True
        opened = seq.tools.advance(token)
        if opened is not None:
            opts = seq.sampling
            stop_ids = sorted({*opts.stop_token_ids, *self.eos_ids})
            seq.tool_args = self._grammars.state(
                GuidedSpec(GuidedKind.JSON_SCHEMA, opened.schema), stop_ids, []
            )
        return True

    async def _pull(self, request: GenerateRequest, seq: Sequence) -> tuple[Any, int]:
        """Pull the prefill's KV; ``(None, 0)`` means recompute (policy ``recompute``); else EngineError."""
        desc = request.kv
        assert desc is not None
        cfg = self.model_config
        try:
            if (desc.num_layers, desc.num_kv_heads, desc.head_dim) != (
                cfg.num_layers,
                cfg.num_kv_heads,
                cfg.head_dim,
            ):
                raise KvPullError(
                    f"KV layout {desc.num_layers}x{desc.num_kv_heads}x{desc.head_dim} does not fit this model"
                )
            if (desc.window, tuple(desc.windowed_layers)) != self._kv_windows:
                raise KvPullError(
                    f"KV with window {desc.window} on layers {desc.windowed_layers} does not fit this model's "
                    f"window {self._kv_windows[0]} on layers {list(self._kv_windows[1])}"
                )
            # The last known token is always fed again to get its logits, so at most len - 1 positions import.
            if not 0 < desc.num_tokens < len(seq.tokens):
                raise KvPullError(f"KV of {desc.num_tokens} tokens for a sequence of {len(seq.tokens)}")
            if self.config.fault_kv_pull_delay_s:
                await asyncio.sleep(self.config.fault_kv_pull_delay_s)
            device = self.device if self.device.type == "cuda" else None
            # Ranked: bytes fetched over TCP land in shared memory, where each rank reads its part itself.
            pulled = await pull_kv(desc, self._kv_config, device, shared=self.plan.ranked)
        except KvPullError as e:
            if self.config.kv_failure_policy == "fail":
                raise EngineError(f"KV import failed: {e}", status=503, code="kv_transfer_failed") from e
            log.warning("request %s: KV import failed (%s); recomputing the prompt", request.request_id, e)
            self._count_recompute()
            return None, 0
        self._count_transfer(pulled.nbytes, pulled.seconds)
        return pulled, min(desc.num_tokens, seq.prompt_len)

    # ---- the engine thread ---------------------------------------------------------------------------------

    def _thread_main(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            self._load()
        except BaseException as e:
            log.exception("%s engine failed to start", self.name.value)
            self._stop_ranks(failed=True)
            ready.set_exception(e)
            return
        ready.set_result(None)
        try:
            with torch.inference_mode():
                self._run()
        except BaseException as e:  # a bug or a dead rank, not a request's fault: fail everything, never hang
            log.exception("%s engine thread died", self.name.value)
            self._failure = e
            self._stop_ranks(failed=True)
            self._fail_all(EngineError(f"engine failed: {e}", status=503, code="engine_failed"))
            on_failure = self.on_failure
            if on_failure is not None:
                on_failure(e)
        else:
            self._stop_ranks(failed=False)
        finally:
            if self._activity is not None:
                self._activity.idle()

    def _load(self) -> None:
        """On the engine thread, before the first step: what ``_run`` steps through (``_runner``, ``_scheduler``)
        and what ``stop`` frees. Here: the torch model, its KV cache, CUDA graphs and ranks (``EngineSetup``)."""
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        if self.device.type == "cuda":
            # Graph capture and "current stream" calls follow this thread's device, not the tensors'.
            torch.cuda.set_device(self.device)
        comms = None
        if self.plan.ranked:
            self._ranks = RankProcesses(self.config, self.plan, self._on_rank_death)
            comms = self._ranks.start(self.device)
        setup = EngineSetup(
            self.config,
            self.model_files,
            self.model_config,
            self.device,
            self.dtype,
            self.max_seq_len,
            self._kv_config,
            self.exporter,
            self._kv_event,
            self.plan,
            comms,
        )
        try:
            with torch.inference_mode():
                setup.load()
                if self.config.warmup:
                    setup.warmup()
        finally:  # what was built, also when a later part failed (``stop`` frees the pool)
            self._model, self._cache, self._graphs = setup.model, setup.cache, setup.graphs
            self._pool, self._scheduler = setup.pool, setup.scheduler
            self._runner = setup.runner
            self._shared = setup.shared
        if isinstance(self._model, GptOssModel):
            # Its 201k-token vocabulary takes xgrammar seconds to index, holding the GIL: done here, before
            # serving, it can't silence the worker's heartbeats in the middle of a request.
            self._grammars.warm()

    def _on_rank_death(self, rank: int, code: int) -> None:
        """From the rank watcher: wake the engine thread, which fails (a collective may already have)."""
        self._inbox.put(("rank_died", RankFailure(f"rank {rank} exited with code {code}")))

    def _stop_ranks(self, failed: bool) -> None:
        """Stop the follower ranks: told to (a clean stop), or killed by PID after a short wait (a failure: they
        may be blocked in a collective with the rank that died)."""
        if self._ranks is not None:
            self._ranks.expect_exit()
        if self._runner is not None and not failed:
            self._runner.close()
        if self._ranks is not None:
            self._ranks.stop(timeout_s=1.0 if failed else self.config.stop_timeout_s)

    def _run(self) -> None:
        sched = self._scheduler
        assert sched is not None
        stopping = False
        activity = self._activity
        while not stopping:
            if activity is not None and not sched.has_work:
                activity.idle()  # about to wait: another engine's prefill may take our cores meanwhile
            stopping = self._drain(block=not sched.has_work)
            if stopping:
                break
            if activity is not None and sched.has_work:
                activity.working()
            for seq in sched.admit():
                self._on_admit(seq)
            self._update_gauges()
            if not sched.running:
                continue
            plan = sched.plan()
            if plan.num_tokens:
                self._timed_step(plan)
            self._update_gauges()
        self._fail_all(EngineError("engine stopped", status=503, code="engine_stopped"))

    def _fail_all(self, error: EngineError) -> None:
        sched = self._scheduler
        assert sched is not None
        while True:  # requests still in the inbox, too
            try:
                kind, seq = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                sched.add(seq)
        for seq in [*sched.running, *sched.waiting]:
            sched.remove(seq)
            self._close_pulled(seq)
            seq.stream.fail(error)
        self._update_gauges()

    def _drain(self, block: bool) -> bool:
        """Apply queued adds/aborts; True when asked to stop."""
        sched = self._scheduler
        assert sched is not None
        while True:
            try:
                kind, seq = self._inbox.get() if block else self._inbox.get_nowait()
            except queue.Empty:
                return False
            block = False
            if kind == "stop":
                return True
            if kind == "rank_died":
                raise seq
            if kind == "add":
                if seq.abandoned:
                    self._close_pulled(seq)
                    seq.state = SeqState.DONE
                else:
                    sched.add(seq)
            elif kind == "abort" and seq.state is not SeqState.DONE:
                sched.remove(seq)
                self._close_pulled(seq)

    def _update_gauges(self) -> None:
        sched = self._scheduler
        assert sched is not None
        slots = sched.cache
        self._stats.kv_usage = sched.kv_tokens / (slots.max_slots * slots.max_seq_len)

    def _close_pulled(self, seq: Sequence) -> None:
        if seq.pulled is not None:
            seq.pulled.close()
            seq.pulled = None

    def _kv_event(self, event: tuple[int, list[int]]) -> None:
        """Prefix-cache changes, from the engine thread; the worker publishes them for the kv router."""
        sink = self.on_kv_event
        if sink is not None:
            sink(event)

    def _on_admit(self, seq: Sequence) -> None:
        """Copy an imported KV into the sequence's new slot, then let the exporter free it."""
        if seq.pulled is None:
            return
        assert self._runner is not None
        try:
            n = seq.pulled.layout.num_tokens
            self._runner.write_kv(seq.slot, seq.pulled)
            seq.num_computed = n
        except RankFailure:
            raise
        except Exception as e:  # closed under us, or bytes that don't fit: recompute instead
            log.warning("request %s: KV copy-in failed (%s); recomputing", seq.request_id, e)
            seq.num_computed, seq.cached_tokens = 0, 0
            seq.stream.set_cached_tokens(0)
            self._count_recompute()
        finally:
            self._close_pulled(seq)

    def _timed_step(self, plan: StepPlan) -> None:
        """``_step`` on this thread's threads, or, for a prefill step while the process's other engines have no
        work, on the threads ``StepThreads`` picks (timed per prompt token for its next choice)."""
        borrow, tokens = self._borrow, plan.num_tokens
        if borrow is None:
            self._step(plan)
            return
        assert self._activity is not None
        borrowing = not plan.decode and tokens >= BORROW_MIN_TOKENS and self._activity.alone()
        threads = borrow.choose(tokens) if borrowing else self.config.threads
        if threads != self._threads_now:
            torch.set_num_threads(threads)
            self._threads_now = threads
        starts, started = self._activity.activity.starts, time.perf_counter()
        self._step(plan)
        # Timed only if no other engine started work meanwhile (``cores``: not what the threads cost alone).
        if borrowing and self._activity.activity.starts == starts:
            borrow.record(tokens, threads, (time.perf_counter() - started) / tokens)

    def _step(self, plan: StepPlan) -> None:
        assert self._runner is not None and self._scheduler is not None
        try:
            decode = [(s.slot, s.num_computed, s.tokens[-1]) for s in plan.decode]
            if self._graphs is not None and not plan.prefill and len(decode) <= self._graphs.max_batch:
                logits = self._graphs.run(decode)  # rows in plan.decode order, as plan.sample
            else:
                prefill = [(s.slot, start, s.tokens[start : start + n]) for s, start, n in plan.prefill]
                logits = self._runner.forward(decode, prefill, plan.sample_rows + plan.score_rows)
                if plan.score:
                    score_prompts(logits[len(plan.sample_rows) :], plan.score)
                    logits = logits[: len(plan.sample_rows)]
            samplers = [s.sampler for s in plan.sample]
            raw = raw_logprobs(logits, plan.sample)  # of the model's distribution, before anything changes it
            apply_penalties(logits, plan.sample)
            # Reasoning past its budget: the tokens that open the answer are written, not sampled (never inside a
            # strict tool's arguments); a grammar applies once the answer has opened.
            forced = [
                s.gate.forced if s.gate is not None and s.tool_args is None else None for s in plan.sample
            ]
            mask_rows(logits, [_row_grammar(s) for s in plan.sample])
            # A grammar decides when its output may end: min_tokens can't hold its stop ids back (that could
            # leave a row with no token at all).
            suppress = [
                None if s.grammar is not None or s.tool_args is not None else suppressed_ids(s, self.eos_ids)
                for s in plan.sample
            ]
            tokens = sample_batch(logits, samplers, suppress)
            if any(f is not None for f in forced):
                tokens = [t if f is None else f for t, f in zip(tokens, forced, strict=True)]
            logprobs = pick_logprobs(raw, plan.sample, tokens)
        except RankFailure:
            raise
        except Exception as e:
            if self.plan.ranked:  # the ranks may be out of step now: not one request's failure
                raise RankFailure(f"ranked step failed: {e}") from e
            log.exception("engine step failed; failing its %d sequences", len(plan.sequences))
            for seq in plan.sequences:
                self._scheduler.remove(seq)
                seq.stream.fail(EngineError(f"engine step failed: {e}", status=500))
            return
        self._stats.last_batch_size = len(plan.decode) + len(plan.prefill)
        for seq in plan.decode:
            seq.num_computed += 1
        for seq, _, n in plan.prefill:
            seq.num_computed += n
        for seq, token, lp in zip(plan.sample, tokens, logprobs, strict=True):
            self._on_token(seq, token, lp)

    def _on_token(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None = None) -> None:
        assert self._scheduler is not None
        guided = seq.grammar is not None and seq.tool_args is None and _grammar_applies(seq)
        followed = seq.tools is None or self._follow_tools(seq, token)
        if not followed or (guided and not seq.grammar.accept(token)):  # masked out: never, unless a bug
            self._scheduler.remove(seq)
            seq.stream.fail(EngineError(f"sampled token {token} outside the request's grammar", status=500))
            return
        if seq.gate is not None:
            seq.gate.advance(token)
        if seq.prompt_scores is not None:  # the prompt's logprobs go out with its first token
            seq.stream.set_prompt_logprobs(seq.prompt_scores)
            seq.prompt_scores = None
        seq.tokens.append(token)
        seq.num_generated += 1
        self._stats.total_tokens += 1
        reason = stop_reason(seq, token, self.eos_ids, self.max_seq_len)
        if reason is None and guided and seq.grammar.terminated:
            reason = FinishReason.STOP
        if seq.phase is Phase.PREFILL:
            desc = self._export(seq) if reason is None else None  # reads the slot: before it is freed
            self._scheduler.remove(seq)
            if reason is not None:
                seq.stream.push(token, logprobs)
                seq.stream.finish(reason)
            elif desc is not None:
                seq.stream.push(token, logprobs)
                seq.stream.finish(None, kv=desc)
            return
        seq.stream.push(token, logprobs)
        if reason is not None:
            self._scheduler.remove(seq)
            seq.stream.finish(reason, cached_tokens=seq.cached_tokens)

    def _export(self, seq: Sequence) -> KvDescriptor | None:
        """Copy the computed prompt KV into an exporter hold and publish it; None (stream failed, or nobody
        listens any more) when that is not possible."""
        assert self.exporter is not None and self._runner is not None
        started = time.perf_counter()
        cfg = self.model_config
        window, windowed = self._kv_windows
        layout = KvLayout(
            cfg.num_layers,
            cfg.num_kv_heads,
            cfg.head_dim,
            self.kv_dtype,
            seq.num_computed,
            window,
            windowed,
        )
        try:
            hold = self.exporter.allocate(layout, seq.request_id)
            seq.transfer_id = hold.transfer_id
            self._runner.read_kv(seq.slot, hold)
            desc = self.exporter.publish(hold)
        except RankFailure:
            raise
        except Exception as e:  # KvCapacityError, or the OS refusing shared memory
            if seq.transfer_id:
                self.exporter.release(seq.transfer_id)
            code = "kv_capacity" if isinstance(e, KvCapacityError) else "kv_export_failed"
            seq.stream.fail(EngineError(f"KV export failed: {e}", status=503, code=code))
            return None
        if seq.abandoned:  # the consumer left while we exported: nobody will ever pull this
            self.exporter.release(hold.transfer_id)
            return None
        self._count_transfer(layout.nbytes, time.perf_counter() - started)
        return desc


def _row_grammar(seq: Sequence) -> Any:
    """The grammar that masks ``seq``'s next token: a strict tool's arguments, else the answer's (if it applies)."""
    if seq.tool_args is not None:
        return seq.tool_args
    return seq.grammar if _grammar_applies(seq) else None


def _grammar_applies(seq: Sequence) -> bool:
    """Whether ``seq``'s next token is constrained by its grammar: for a reasoning model only in the answer."""
    return seq.gate is None or seq.gate.in_answer
