"""The llama.cpp decode loop: continuous batching of many sequences in one context.

One thread owns the llama.cpp context, and it is the only thread of the process that
makes llama.cpp compute: the self-check and embeddings run on it too, between steps
(``DecodeLoop.call``). With llama.cpp's OpenMP build, every thread that computes gets a
team of OpenMP threads of its own, and once a process has more of those threads than
cores, libgomp stops spinning at the barriers ggml places between operations and
sleeps instead: a one-token decode from a second thread took 2-5x as long as from the
first one on a 2-core box, for as long as the first thread's team lived.

Each step it drops cancelled sequences,
admits waiting ones into free slots, packs one token per generating sequence and
a bounded slice of pending prompt tokens into a single batch, decodes it, samples
every sequence that produced logits, and hands the step's token events to the
event loop in one call.

Determinism (CONTRACT.md section 2: temperature 0 gives the same text alone, batched
or cached) rests on three things, each checked by the tests:

- one KV stream per slot (``kv_unified = false``): a sequence's cells start at
  position 0 of its own stream whatever its neighbours hold;
- llama.cpp built without LLAMAFILE (scripts/bootstrap): its tinyBLAS kernels only
  run for two or more rows, so logits would depend on how many sequences share a
  step; ggml's own kernels compute every row the same way;
- flash attention off: its CPU kernel tiles multi-token batches, so a prompt's KV
  would depend on how the prompt was split.

With those, a token's KV is the same however the prompt around it was batched, so
prefix reuse may take any prefix of a slot's cached tokens (prompt or generated);
prompts are still prefilled in ``PREFILL_CHUNK`` pieces to bound each step.

Speed: llama.cpp computes a batch's tokens in one pass only over a consecutive run of
KV streams listed in order; slots 0, 1, 2 decode together, slots 1, 3, 5 (or 2, 0, 1)
as separate passes, each about as dear as a lone sequence. So a step lists its tokens
in slot order, and a new request goes to the free slot that keeps the busy slots in
the fewest runs, unless another slot's cached prefix saves more prompt work than an
extra pass per step costs (``RUN_COST_TOKENS``).

Speculation (``llamacpp_speculation``): with it on, a generating sequence's token may
come with tokens drafted by prompt lookup (``llamacpp_ngram``), verified in the same
batch; the cells of drafted tokens the model did not choose are removed before the
next step, so a slot's cells stay exactly the tokens it has emitted. The same
invariance makes a verified token's logits those of a one-token step.
"""

from __future__ import annotations

import codecs
import concurrent.futures
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import llama_cpp
import structlog

from edge_agent.engine.backends.llamacpp_ngram import NgramIndex
from edge_agent.engine.backends.llamacpp_sampling import SamplerChain, logprobs_of
from edge_agent.engine.backends.llamacpp_speculation import (
    DraftPolicy,
    SpeculationOptions,
    VerifyCosts,
    verify,
)
from edge_agent.engine.backends.llamacpp_vocab import Vocabulary
from edge_agent.engine.types import (
    BackendError,
    FinishReason,
    GenerationRequest,
    TokenEvent,
    TopLogprob,
)

log = structlog.get_logger(__name__)

PREFILL_CHUNK = 64
# Prompt tokens a reused prefix must save before a slot that splits the busy slots into
# one more run is worth it: a run costs about one lone decode every step it lasts.
RUN_COST_TOKENS = 128
# What a cached token a new sequence would overwrite is worth, against one it reuses: it
# may be asked for again (the same document, the next turn of another chat), or not. At
# zero, a 10-token chat-template prefix drew every new prompt into the same slot and a
# 200-token prompt asked again a moment later had to be prefilled again.
DROPPED_TOKEN_WORTH = 0.5


@dataclass(eq=False)
class SequenceState:
    """One request's sequence, shared by its submitter (``cancelled``) and the decode thread.

    ``key`` names it to the submitter: the engine process's messages carry it.
    """

    request: GenerationRequest
    sampler: SamplerChain
    key: int = 0
    cancelled: bool = False
    slot: int = -1
    n_past: int = 0  # cells of this sequence written in its KV stream
    prompt_cursor: int = 0  # next prompt token to prefill
    generated: int = 0
    last_token: int = -1
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    # With speculation on: the prompt and emitted tokens to draft from, and how far
    # drafting pays for this sequence.
    ngram: NgramIndex | None = None
    policy: DraftPolicy | None = None

    @property
    def prefilling(self) -> bool:
        return self.prompt_cursor < len(self.request.prompt_tokens)


# What a decode step hands out, from the decode thread: each sequence's new events, or
# the error that ended it. One call per step, so crossing to another thread or process
# costs once per step, not once per token.
StepOutput = list[tuple[SequenceState, list[TokenEvent] | BaseException]]
StepSink = Callable[[StepOutput], None]


@dataclass
class Slot:
    """A KV stream and what it holds, kept after a sequence ends for prefix reuse."""

    index: int
    cached: list[int] = field(default_factory=list)
    busy: bool = False


T = TypeVar("T")


@dataclass(slots=True)
class _Call:
    """Work for the decode thread between steps (``DecodeLoop.call``)."""

    fn: Callable[[], Any]
    future: concurrent.futures.Future[Any]


class DecodeLoop:
    """Owns the llama.cpp context on a thread of its own; thread-safe ``submit`` and ``call``."""

    def __init__(
        self,
        *,
        ctx: Any,
        vocab: Vocabulary,
        n_slots: int,
        n_ctx_seq: int,
        n_batch: int,
        prefix_cache: bool,
        sink: StepSink,
        speculation: SpeculationOptions | None = None,
        verify_costs: VerifyCosts | Callable[[], VerifyCosts] | None = None,
    ) -> None:
        """``verify_costs``: what verifying drafted tokens costs (``llamacpp_speculation``),
        or what measures it, called on the decode thread before its first step."""
        self._ctx = ctx
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._vocab = vocab
        self._n_vocab = vocab.n_vocab
        self._n_ctx_seq = n_ctx_seq
        self._n_batch = n_batch
        self._prefix_cache = prefix_cache
        self._token_bytes = vocab.token_bytes
        self._sink = sink
        self._slots = [Slot(i) for i in range(n_slots)]
        self._inbox: queue.SimpleQueue[SequenceState | _Call | None] = queue.SimpleQueue()
        self._waiting: deque[SequenceState] = deque()
        self._active: list[SequenceState] = []
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._thread = threading.Thread(target=self._run, name="llamacpp-decode", daemon=True)
        self._prepared = threading.Event()
        self._stopping = False
        self._calls_closed = threading.Lock()  # no call is queued after stop drains them
        self._speculation = speculation if speculation and speculation.enabled else None
        self._measure_costs = verify_costs if callable(verify_costs) else None
        self._verify_costs = None if callable(verify_costs) else verify_costs
        self.steps = 0
        self.drafted = 0  # drafted tokens verified, over all sequences
        self.accepted = 0  # of which the model chose

    def start(self) -> None:
        """Start the decode thread; returns once it can take work at full speed (the
        engine is not ready while it still times its verify costs)."""
        self._thread.start()
        self._prepared.wait()

    def submit(self, sequence: SequenceState) -> None:
        self._inbox.put(sequence)

    def call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run ``fn`` on the decode thread before its next step: any llama.cpp work of
        this process (a self-check, embeddings) goes here, see the module's doc."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._calls_closed:
            if self._stopping:
                future.set_exception(BackendError("the decode loop has stopped"))
            else:
                self._inbox.put(_Call(fn, future))
        return future

    def stop(self) -> None:
        with self._calls_closed:
            self._stopping = True
        self._inbox.put(None)
        self._thread.join(timeout=30)
        llama_cpp.llama_batch_free(self._batch)
        # Calls the thread did not reach fail rather than leave their callers waiting.
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Call):
                item.future.set_exception(BackendError("the decode loop has stopped"))

    @property
    def busy_slots(self) -> int:
        return sum(slot.busy for slot in self._slots)

    # --- the decode thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._prepare_speculation()
        finally:
            self._prepared.set()
        while not self._stopping:
            self._take_inbox(block=not self._active and not self._waiting)
            self._drop_cancelled()
            self._admit()
            if not self._active:
                continue
            try:
                self._step()
            except BaseException as exc:  # a failed decode fails its sequences, not the daemon
                log.error("decode_failed", error=str(exc))
                failed: StepOutput = []
                for sequence in self._active:
                    self._release(sequence)
                    failed.append((sequence, BackendError(f"llama.cpp decode failed: {exc}")))
                self._active.clear()
                self._sink(failed)

    def _prepare_speculation(self) -> None:
        # Timed on the thread that decodes, under the conditions it decodes in.
        if self._speculation is None:
            return
        if self._measure_costs is not None:
            try:
                self._verify_costs = self._measure_costs()
            except Exception as exc:
                log.error("speculation_off", reason=f"timing the verify costs failed: {exc}")
        costs = self._verify_costs
        if costs is None or costs.max_draft < self._speculation.max_draft:
            log.error("speculation_off", reason="no verify cost for every draft length")
            self._speculation = None

    def _take_inbox(self, *, block: bool) -> None:
        try:
            item = self._inbox.get(block=block)
            while True:
                if item is None:
                    self._stopping = True
                    return
                if isinstance(item, _Call):
                    self._run_call(item)
                else:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return

    @staticmethod
    def _run_call(call: _Call) -> None:
        if not call.future.set_running_or_notify_cancel():
            return
        try:
            call.future.set_result(call.fn())
        except BaseException as exc:  # the caller's failure, not the loop's
            call.future.set_exception(exc)

    def _drop_cancelled(self) -> None:
        for sequence in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(sequence)
            sequence.sampler.free()
        for sequence in [s for s in self._active if s.cancelled]:
            self._active.remove(sequence)
            self._release(sequence)

    def _admit(self) -> None:
        while self._waiting:
            free = sum(not slot.busy for slot in self._slots)
            if not free:
                return
            # When the waiting sequences take every free slot, the busy slots end up in
            # one run whichever goes where: then only the cached prefixes matter.
            fills_all = len(self._waiting) >= free
            sequence = self._waiting.popleft()
            slot, reuse = choose_slot(
                self._slots,
                sequence.request.prompt_tokens,
                prefix_cache=self._prefix_cache,
                keep_runs=not fills_all,
            )
            slot.busy = True
            # Keep the reused prefix's cells, drop the rest of what the slot held.
            llama_cpp.llama_memory_seq_rm(self._memory, slot.index, reuse, -1)
            del slot.cached[reuse:]
            sequence.slot = slot.index
            sequence.n_past = reuse
            sequence.prompt_cursor = reuse
            options = self._speculation
            if options is not None and sequence.ngram is None:
                sequence.ngram = NgramIndex(
                    sequence.request.prompt_tokens,
                    min_n=options.min_ngram,
                    max_n=options.max_ngram,
                )
                assert self._verify_costs is not None
                sequence.policy = DraftPolicy(self._verify_costs)
            self._active.append(sequence)

    def _step(self) -> None:
        batch = self._batch
        n = 0
        sampled: list[tuple[SequenceState, int]] = []
        verifying: list[tuple[SequenceState, int, list[int]]] = []
        # In slot order: llama.cpp decodes one token of each of 8 KV streams about a third
        # slower when the batch lists the streams out of order.
        generating = sorted((s for s in self._active if not s.prefilling), key=_slot_of)
        # Drafts never take the room a prompt chunk needs this step.
        room = self._n_batch - len(generating) - PREFILL_CHUNK
        for sequence in generating:
            draft = self._draft(sequence, room)
            room -= len(draft)
            verifying.append((sequence, n, draft))
            self._put(n, sequence.last_token, sequence.n_past, sequence.slot, True)
            n += 1
            for offset, token in enumerate(draft, start=1):
                self._put(n, token, sequence.n_past + offset, sequence.slot, True)
                n += 1
        # Prompt work per step is bounded while other sequences stream, so a long
        # prompt arriving adds at most one chunk's cost to their next token.
        budget = self._n_batch - n
        if generating:
            budget = min(budget, PREFILL_CHUNK)
        for sequence in self._active:
            if not sequence.prefilling or budget <= 0:
                continue
            prompt = sequence.request.prompt_tokens
            while sequence.prefilling and budget > 0:
                start = sequence.prompt_cursor
                chunk_end = min(len(prompt), (start // PREFILL_CHUNK + 1) * PREFILL_CHUNK)
                if chunk_end - start > budget:
                    break  # never split an aligned chunk across steps
                for position in range(start, chunk_end):
                    last = position == len(prompt) - 1
                    self._put(n, prompt[position], position, sequence.slot, last)
                    if last:
                        sampled.append((sequence, n))
                    n += 1
                budget -= chunk_end - start
                sequence.prompt_cursor = chunk_end
                sequence.n_past = chunk_end
                self._slots[sequence.slot].cached.extend(prompt[start:chunk_end])
        if n == 0:
            return
        batch.n_tokens = n
        started = time.perf_counter()
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            raise BackendError(f"llama_decode returned {status}")
        if n == 1 and generating and self._verify_costs is not None:
            self._verify_costs.observe(time.perf_counter() - started)
        self.steps += 1
        outbox: StepOutput = []
        for sequence, index, draft in verifying:
            outbox.append((sequence, self._verify(sequence, index, draft)))
        for sequence, index in sampled:
            outbox.append((sequence, [self._sample(sequence, index)]))
        for sequence, events in outbox:
            if isinstance(events, list) and events[-1].finish_reason is not None:
                self._active.remove(sequence)
                self._release(sequence)
        if outbox:
            self._sink(outbox)

    def _draft(self, sequence: SequenceState, room: int) -> list[int]:
        """Tokens to verify after the sequence's sampled one this step, maybe none."""
        if sequence.ngram is None or sequence.policy is None:
            return []
        # Never draft past what the sequence may still emit (its last verified token
        # brings one more), nor past the end of its context.
        limit = min(
            sequence.policy.max_draft,
            sequence.request.params.max_tokens - sequence.generated - 1,
            self._n_ctx_seq - 1 - sequence.n_past,
            room,
        )
        draft = sequence.ngram.draft(limit)
        return draft[: sequence.policy.length(len(draft))]

    def _verify(self, sequence: SequenceState, index: int, draft: list[int]) -> list[TokenEvent]:
        """The events of a sequence fed its sampled token at ``index``, drafted ones after."""
        slot = self._slots[sequence.slot]
        slot.cached.append(sequence.last_token)
        base = sequence.n_past + 1  # cells written before the token drawn at row 0
        events: list[TokenEvent] = []

        def draw(i: int) -> int | None:
            # Row i follows the sampled token and the first i drafted ones, all accepted.
            sequence.n_past = base + i
            event = self._sample(sequence, index + i)
            events.append(event)
            return None if event.finish_reason is not None else event.token_id

        accepted = verify(draft, draw)
        sequence.n_past = base + accepted
        if draft:
            slot.cached.extend(draft[:accepted])
            # The cells of drafted tokens not chosen go, so the slot holds what was emitted.
            llama_cpp.llama_memory_seq_rm(self._memory, sequence.slot, sequence.n_past, -1)
            chosen = events[-1].token_id
            rejected = accepted < len(draft) and chosen is not None and chosen != draft[accepted]
            if sequence.policy is not None:
                sequence.policy.record(len(draft), accepted, rejected)
            self.drafted += len(draft)
            self.accepted += accepted
        return events

    def _put(self, i: int, token: int, position: int, seq: int, logits: bool) -> None:
        batch = self._batch
        batch.token[i] = token
        batch.pos[i] = position
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits

    def _sample(self, sequence: SequenceState, index: int) -> TokenEvent:
        params = sequence.request.params
        token = sequence.sampler.sample(self._ctx, index)
        if self._vocab.is_end_of_generation(token):
            tail = sequence.decoder.decode(b"", final=True)
            return TokenEvent(token_id=None, text=tail, finish_reason="stop")
        logprob: float | None = None
        top: tuple[TopLogprob, ...] = ()
        if params.logprobs is not None:
            logprob, best = logprobs_of(self._ctx, index, self._n_vocab, token, params.logprobs)
            top = tuple(
                TopLogprob(self._token_bytes(t).decode("utf-8", errors="replace"), lp)
                for t, lp in best
            )
        sequence.generated += 1
        # Its KV cell is written when it is fed back in the next step, at position n_past.
        sequence.last_token = token
        if sequence.ngram is not None:
            sequence.ngram.append(token)
        text = sequence.decoder.decode(self._token_bytes(token))
        finish: FinishReason | None = None
        if sequence.generated >= params.max_tokens or sequence.n_past >= self._n_ctx_seq:
            finish = "length"
            text += sequence.decoder.decode(b"", final=True)
        return TokenEvent(token, text, finish, logprob, top)

    def _release(self, sequence: SequenceState) -> None:
        # slot.cached lists exactly the cells written, so it stays valid for prefix reuse.
        self._slots[sequence.slot].busy = False
        sequence.sampler.free()
        policy = sequence.policy
        if policy is not None and policy.drafted:
            # Per request, so a box's log says where speculation pays and where it paused.
            log.info(
                "speculation",
                request_id=sequence.request.request_id,
                generated=sequence.generated,
                drafted=policy.drafted,
                accepted=policy.accepted,
                pauses=policy.pauses,
            )


def choose_slot(
    slots: Sequence[Slot], prompt: Sequence[int], *, prefix_cache: bool, keep_runs: bool = True
) -> tuple[Slot, int]:
    """The free slot for a new sequence, and how many of its cached tokens to reuse.

    Fewest runs of busy slots first (with ``keep_runs``), then the longest reusable
    prefix less what the slot's cache would lose, weighed one against the other by
    ``RUN_COST_TOKENS`` and ``DROPPED_TOKEN_WORTH``; among equals the emptiest cache (the
    least likely to be wanted later), then the lowest index.
    """
    busy = {slot.index for slot in slots if slot.busy}
    best: Slot | None = None
    best_reuse = 0
    best_key: tuple[float, int, int] | None = None
    for slot in slots:
        if slot.busy:
            continue
        reuse = 0
        if prefix_cache:
            # Always leave one prompt token to decode, so the first sample has fresh logits.
            reuse = max(0, min(_common_prefix(slot.cached, prompt), len(prompt) - 1))
        runs = _runs(busy | {slot.index}) if keep_runs else 0
        dropped = len(slot.cached) - reuse
        worth = reuse - RUN_COST_TOKENS * runs - DROPPED_TOKEN_WORTH * dropped
        key = (worth, -len(slot.cached), -slot.index)
        if best_key is None or key > best_key:
            best, best_reuse, best_key = slot, reuse, key
    if best is None:
        raise ValueError("no free slot")
    return best, best_reuse


def _runs(indices: set[int]) -> int:
    """How many runs of consecutive numbers the set falls into."""
    return sum(1 for i in indices if i - 1 not in indices)


def _slot_of(sequence: SequenceState) -> int:
    return sequence.slot


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
