"""What one worker of an engine can do: the profile the planner sizes pools with.

Two tables, in seconds of wall time:

- prefill: ISL → the time one prefill worker takes to answer one request of that many prompt tokens alone
  (its TTFT with no queue). ISL / that time is the worker's prefill throughput at that ISL.
- decode: (concurrency, context) → ITL: the time one decode step takes with ``concurrency`` sequences of
  ``context`` tokens each in the batch.

``mocker_profile`` computes both from the mocker's timing model (in milliseconds of CPU, for tests);
``measure_profile`` measures them on any engine through the ``Engine`` interface (a short, bounded run).
The file is JSON::

    python -m dynamo_lite.planner profile --engine mocker --output mocker.json
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from bisect import bisect_left
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dynamo_lite.engines.mocker import MockerTiming

PROFILE_VERSION = 1
DEFAULT_ISLS = (128, 256, 512, 1024, 2048, 3072)
DEFAULT_CONCURRENCIES = (1, 2, 4, 8, 16)
DEFAULT_CONTEXTS = (256, 1024, 2048, 4096)


@dataclass(slots=True)
class EngineProfile:
    """Prefill time by ISL and decode ITL by (concurrency, context), for one worker; interpolated linearly
    between the measured points and extrapolated linearly past the last ones."""

    engine: str
    max_batch_size: int
    isls: list[int]
    prefill_s: list[float]  # one per ISL
    concurrencies: list[int]
    contexts: list[int]
    itl_s: list[list[float]]  # [concurrency index][context index]
    source: str = ""  # how it was made: "mocker timing model", "measured"
    notes: dict = field(default_factory=dict)

    def prefill_seconds(self, isl: float) -> float:
        """One request of ``isl`` prompt tokens on an idle prefill worker: its TTFT without queueing."""
        return max(_interp(self.isls, self.prefill_s, isl), 1e-6)

    def itl(self, concurrency: float, context: float) -> float:
        """One decode step with ``concurrency`` sequences of ``context`` tokens."""
        by_context = [_interp(self.contexts, row, context) for row in self.itl_s]
        return max(_interp(self.concurrencies, by_context, max(concurrency, 1.0)), 1e-6)

    def max_concurrency(self, context: float, itl_target_s: float) -> int:
        """The most sequences one decode worker can batch at ``context`` with ITL within the target (0: none)."""
        best = 0
        for c in range(1, self.max_batch_size + 1):
            if self.itl(c, context) > itl_target_s:
                break
            best = c
        return best

    def to_json(self) -> str:
        return json.dumps({"version": PROFILE_VERSION, **asdict(self)}, indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> EngineProfile:
        data = json.loads(Path(path).read_text())
        if data.pop("version", None) != PROFILE_VERSION:
            raise ValueError(f"{path}: not a version-{PROFILE_VERSION} planner profile")
        profile = cls(**data)
        if len(profile.prefill_s) != len(profile.isls) or len(profile.itl_s) != len(profile.concurrencies):
            raise ValueError(f"{path}: table sizes don't match their axes")
        if any(len(row) != len(profile.contexts) for row in profile.itl_s):
            raise ValueError(f"{path}: an ITL row doesn't match the contexts")
        return profile


def _interp(xs: list[int], ys: list[float], x: float) -> float:
    """Piecewise-linear through (xs, ys), extended linearly beyond both ends."""
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def mocker_profile(
    timing: MockerTiming | None = None,
    speedup_ratio: float = 1.0,
    max_batch_size: int = 16,
    isls: tuple[int, ...] = DEFAULT_ISLS,
    concurrencies: tuple[int, ...] = DEFAULT_CONCURRENCIES,
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS,
) -> EngineProfile:
    """The mocker's profile from its own timing model (``engines/mocker.py``): a prefill request pays the
    prefill sleep, then one decode step (with itself in the batch) that emits its first token."""
    t = timing or MockerTiming()
    scale = 1.0 / speedup_ratio if speedup_ratio > 0 else 0.0

    def step(c: int, ctx: int) -> float:
        return t.decode_base_s + c * t.decode_per_seq_s + c * ctx * t.decode_per_kv_token_s

    prefill = [(t.prefill_base_s + n * t.prefill_per_token_s + step(1, n)) * scale for n in isls]
    itl = [[step(c, ctx) * scale for ctx in contexts] for c in concurrencies]
    return EngineProfile(
        "mocker",
        max_batch_size,
        list(isls),
        prefill,
        list(concurrencies),
        list(contexts),
        itl,
        source="mocker timing model",
        notes={"speedup_ratio": speedup_ratio, "timing": asdict(t)},
    )


async def measure_profile(
    engine,  # an engine of dynamo_lite.engines.base.Engine, not started
    max_batch_size: int,
    isls: tuple[int, ...] = DEFAULT_ISLS,
    concurrencies: tuple[int, ...] = DEFAULT_CONCURRENCIES,
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS,
    decode_tokens: int = 16,
    repeats: int = 2,
    statistic: str = "best",
) -> EngineProfile:
    """Measure a profile on ``engine`` in this process: prefill as the time to the first token of one
    request alone, decode ITL as each stream's (last − first token time) / (tokens − 1) with ``concurrency``
    streams of ``context`` prompt tokens running together, counting only the tokens after every stream has its
    first (median over streams). Each point is the best of ``repeats`` runs (``statistic="best"``: what the
    engine can do, a shared machine only ever makes a run slower) or their median (``"median"``: what it
    typically does on this machine, to predict means measured on it)."""
    if statistic not in ("best", "median"):
        raise ValueError(f"statistic: best or median, not {statistic!r}")

    def pick(values: list[float]) -> float:
        if not values:
            return float("nan")
        return min(values) if statistic == "best" else statistics.median(values)

    from dynamo_lite.protocol import GenerateRequest, SamplingOptions

    vocab = 1000
    first = random.Random().getrandbits(32)  # prompts of one measurement differ from another's: no cache hits
    serial = 0

    def request(n_prompt: int, max_tokens: int) -> GenerateRequest:
        nonlocal serial
        serial += 1
        # distinct prompts: no prefix cache hit between requests, nor with an earlier measurement's
        rng = random.Random(first + serial)
        ids = [256 + rng.randrange(vocab) for _ in range(n_prompt)]
        return GenerateRequest(
            f"profile-{serial}", "profile", ids, SamplingOptions(max_tokens=max_tokens, ignore_eos=True)
        )

    async def run(req: GenerateRequest) -> list[float]:
        times: list[float] = []
        async for chunk in engine.generate(req):
            now = time.perf_counter()
            times.extend([now] * len(chunk.token_ids))
        return times

    await engine.start()
    try:
        await run(request(16, 2))  # warm-up
        prefill = []
        for n in isls:
            runs = []
            for _ in range(repeats):
                started = time.perf_counter()
                times = await run(request(n, 1))
                runs.append((times[0] if times else time.perf_counter()) - started)
            prefill.append(pick(runs))
        itl = []
        for c in concurrencies:
            row = []
            for ctx in contexts:
                runs = []
                for _ in range(repeats):
                    streams = await asyncio.gather(*(run(request(ctx, decode_tokens)) for _ in range(c)))
                    # steady decode only: the tokens after every stream has its first (all prefills done)
                    batched = max((s[0] for s in streams if s), default=0.0)
                    steady = [[t for t in s if t > batched] for s in streams]
                    gaps = sorted((s[-1] - s[0]) / (len(s) - 1) for s in steady if len(s) > 1)
                    if gaps:
                        runs.append(gaps[len(gaps) // 2])
                row.append(pick(runs))
            itl.append(row)
    finally:
        await engine.stop()
    return EngineProfile(
        getattr(engine, "name", "engine"),
        max_batch_size,
        list(isls),
        prefill,
        list(concurrencies),
        list(contexts),
        itl,
        source="measured",
        notes={"decode_tokens": decode_tokens, "repeats": repeats, "statistic": statistic},
    )
