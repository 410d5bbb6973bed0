"""Whisper's decoding rules as ONE batched logits post-processor of TensorRT-LLM's executor, in torch.

The executor calls the batched processor once per decoder step for every request that named it
(`Request.BATCHED_POST_PROCESSOR_NAME`), as
`processor(request_ids, logits, token_ids, stream_ptr, client_ids)`: `logits[i]` is request i's
`[1, beams, vocab_padded]` tensor on the GPU, changed in place before sampling; `token_ids[i]` holds,
per beam, the prompt and the tokens so far; `stream_ptr` is the executor's CUDA stream
(TensorRT-LLM `cpp/tensorrt_llm/batch_manager/logitsPostProcessor.cpp`: the batched callback gets
`(reqIdsVec, logitsVec, beamTokensVec, stream, clientIdsVec)`; `docs/source/executor.md`: users
"must use the stream"; synchronising it "will slow down the entire execution pipeline"; pybind
signature `Callable[[list[int], list[Tensor], list[list[list[int]]], int, list[int | None]], None]`,
`tensorrt_llm/bindings/executor` stubs). Verified against the stored versions of those files; the
exact 0.17.0 tree is not in the stored sources (../../../../docs/gpu.md says which versions).

What one step does, for all its requests at once:
- host side, from the token histories the executor already hands over on the host: per row a few
  integers (forced token, first sampled step, timestamp state), sent to the device in ONE small copy;
- device side, on the executor's stream, as torch operations over the stacked `[rows, vocab]`
  logits: openai-whisper's `SuppressBlank`, `SuppressTokens` and `ApplyTimestampRules` (whisper/
  decoding.py 20250625, the same rules as `engines/whisper_rules.py` in numpy) as masks built from
  index tensors precomputed once per engine; the forced start sequence; the language chosen at the sot
  step (argmax over the language tokens, openai's `detect_language`) when the request asked for auto
  language; the no-speech probability and language probabilities at the sot step, and each sampled
  token's log-probability under the filtered distribution (openai's `sum_logprobs`), gathered into
  per-slot device buffers.
Nothing is copied to the host and nothing synchronises during a step: no `.cpu()`, `.item()`,
`.tolist()` or boolean-mask indexing on device tensors. Each request's measurements are read ONCE, at
its end (`finish`), with one device-to-host copy.

Beam search is not handled: the executor hands each beam SLOT's raw token list (`llmReq->getTokens()`),
not the beam's path (tokens are gathered along parent ids only at the end, and the pinned release gives
the processor no parent ids), so timestamp rules and scores would follow wrong prefixes. The engine
refuses more than one beam while these rules run (`engine.py`, capability `max_beam_size = 1`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..whisper_rules import RequestPlan, RuleTokens

logger = logging.getLogger(__name__)

AUTO_LANGUAGE = -1  # in a plan's forced tokens: the language the sot step reads (argmax over language tokens)

# row kinds
FREE, FORCED, AUTO, DETECT = 0, 1, 2, 3
# row flags
SOT_STEP, BLANK, TIMESTAMPS, INITIAL, PAIR_CLOSED, SEGMENT_OPEN, SCORE_PREVIOUS = (1, 2, 4, 8, 16, 32, 64)
# columns of the per-row metadata
_KIND, _FORCED, _FLAGS, _LOWER, _SLOT, _PREVIOUS, _INITIAL_MAX = range(7)
_META_COLUMNS = 7


@dataclass
class RuleState:
    """One request as the processor knows it (host side); its measurements live in device slots."""

    plan: RequestPlan
    prompt_length: int  # tokens sent to the executor (the history's first tokens)
    slot: int = -1  # row of the device buffers, assigned at the request's first step
    steps: int = 0
    error: str | None = None
    stream_ptr: int | None = None  # the executor stream of its last step (its device values were written there)

    def history(self, beam_tokens: list[int]) -> list[int]:
        return list(beam_tokens[self.prompt_length:])


@dataclass
class Measurements:
    """What `finish` reads back for one request, once."""

    sum_logprob: float | None
    no_speech_prob: float | None
    language_probs: dict[str, float] | None


@dataclass
class _Step:
    """Host-side plan of one processor call (pure Python/numpy; tested without torch)."""

    meta: np.ndarray  # [rows, _META_COLUMNS] int64
    sot_rows: list[int] = field(default_factory=list)
    score_rows: list[int] = field(default_factory=list)
    free_rows: list[int] = field(default_factory=list)


class WhisperRulesProcessor:
    """The executor's batched logits post-processor for Whisper; one per engine.

    `register(client_id, state)` before a request is enqueued (its `client_id` is how the processor
    finds it: the executor's request id only exists after enqueueing); `finish(client_id, tokens,
    ended)` after its final response; `__call__` is what the executor calls at every step.
    """

    def __init__(self, tokens: RuleTokens, torch_module=None, capacity: int = 16, stream_scope=None):
        """`stream_scope(stream_ptr)`: a context that orders work on the executor's stream (engine.CudaDevice);
        None: torch.cuda.stream(torch.cuda.ExternalStream(ptr))."""
        self.tokens = tokens
        self._torch = torch_module
        self._stream_scope = stream_scope
        self._states: dict[int, RuleState] = {}
        self._lock = threading.Lock()  # slots and registry; never held around decoding
        self._free_slots: list[int] = []
        self._capacity = max(1, int(capacity))
        self._buffers: dict[str, Any] | None = None
        self._tables: dict[str, Any] | None = None
        self._next_slot = 0
        self.steps = 0  # processor calls (for logs and tests)
        self.rows = 0  # rows processed over all calls

    # ---- registry ---------------------------------------------------------------------------
    def register(self, client_id: int, state: RuleState) -> None:
        with self._lock:
            self._states[int(client_id)] = state

    def state(self, client_id: int) -> RuleState | None:
        return self._states.get(int(client_id))

    def forget(self, client_id: int) -> None:
        with self._lock:
            state = self._states.pop(int(client_id), None)
            if state is not None and state.slot >= 0:
                self._free_slots.append(state.slot)
                state.slot = -1

    def _assign_slot(self, state: RuleState) -> None:
        with self._lock:
            if self._free_slots:
                state.slot = self._free_slots.pop()
                return
            state.slot, self._next_slot = self._next_slot, self._next_slot + 1
            if state.slot >= self._capacity:
                self._grow(max(self._capacity * 2, state.slot + 1))

    # ---- the executor's callback ------------------------------------------------------------
    def __call__(self, request_ids, logits, token_ids, stream_ptr, client_ids) -> None:
        rows = [(index, self._states.get(int(cid)) if cid is not None else None)
                for index, cid in enumerate(client_ids)]
        rows = [(index, state) for index, state in rows if state is not None and state.error is None]
        if not rows:
            return
        torch = self._import_torch()
        try:
            for _, state in rows:
                state.stream_ptr = stream_ptr
            with self._stream(torch, stream_ptr):
                self._step(torch, [logits[i] for i, _ in rows], [token_ids[i] for i, _ in rows],
                           [state for _, state in rows])
        except Exception as exc:  # raising into the executor's thread would take the runtime down
            logger.exception("Whisper rules processor failed on requests %s", list(request_ids))
            for _, state in rows:
                state.error = f"{type(exc).__name__}: {exc}"

    def _stream(self, torch, stream_ptr):
        """Work on the executor's stream (executor.md: users must use it)."""
        if stream_ptr is None:
            return contextlib.nullcontext()
        if self._stream_scope is not None:
            return self._stream_scope(stream_ptr)
        return torch.cuda.stream(torch.cuda.ExternalStream(stream_ptr))

    def _import_torch(self):
        if self._torch is None:
            import torch

            self._torch = torch
        return self._torch

    # ---- one step ----------------------------------------------------------------------------
    def plan_step(self, histories: list[list[int]], states: list[RuleState]) -> _Step:
        """Per-row integers from the host-side histories: what each row forces, which rules apply."""
        tok = self.tokens
        ts = tok.timestamp_begin
        meta = np.zeros((len(states), _META_COLUMNS), dtype=np.int64)
        step = _Step(meta)
        for row, (history, state) in enumerate(zip(histories, states)):
            plan, n = state.plan, len(history)
            forced = plan.forced
            flags = 0
            if n == 0:
                flags |= SOT_STEP
                step.sot_rows.append(row)
            meta[row, _SLOT] = state.slot
            meta[row, _INITIAL_MAX] = tok.vocab_size
            if plan.detect_only:
                meta[row, _KIND] = DETECT
            elif n < len(forced):
                meta[row, _KIND] = AUTO if forced[n] == AUTO_LANGUAGE else FORCED
                meta[row, _FORCED] = max(forced[n], 0)
            else:
                meta[row, _KIND] = FREE
                step.free_rows.append(row)
                sampled = history[len(forced):]
                m = len(sampled)
                if m >= 1:
                    flags |= SCORE_PREVIOUS
                    meta[row, _PREVIOUS] = sampled[-1]
                    step.score_rows.append(row)
                if m == 0 and plan.suppress_blank:
                    flags |= BLANK
                if plan.timestamps:
                    flags |= TIMESTAMPS
                    last_was = m >= 1 and sampled[-1] >= ts
                    penultimate_was = m < 2 or sampled[-2] >= ts
                    if last_was:
                        flags |= PAIR_CLOSED if penultimate_was else SEGMENT_OPEN
                    last_stamp = next((t for t in reversed(sampled) if t >= ts), None)
                    if last_stamp is not None:
                        meta[row, _LOWER] = last_stamp if (last_was and not penultimate_was) else last_stamp + 1
                    if m == 0:
                        flags |= INITIAL
                        if plan.max_initial_timestamp_index is not None:
                            meta[row, _INITIAL_MAX] = ts + plan.max_initial_timestamp_index
            meta[row, _FLAGS] = flags
        return step

    def _step(self, torch, logits: list, token_ids: list, states: list[RuleState]) -> None:
        width = logits[0].shape[-1]
        for tensor in logits:
            if tensor.numel() != width:
                raise ValueError("the Whisper rules take one beam per request (the engine refuses beam search)")
        for state in states:
            if state.slot < 0:
                self._assign_slot(state)
            state.steps += 1
        histories = [state.history(beams[0]) for beams, state in zip(token_ids, states)]
        step = self.plan_step(histories, states)
        self.steps += 1
        self.rows += len(states)
        first = logits[0]
        self._ensure_buffers(torch, first, width)
        buffers, tables, tok = self._buffers, self._tables, self.tokens
        # ONE host-to-device copy of everything this step needs to know per row
        offsets = [0, step.meta.size, len(step.sot_rows), len(step.score_rows), len(step.free_rows)]
        packed = np.concatenate([step.meta.reshape(-1), np.asarray(step.sot_rows, dtype=np.int64),
                                 np.asarray(step.score_rows, dtype=np.int64),
                                 np.asarray(step.free_rows, dtype=np.int64)])
        device_ints = torch.as_tensor(packed).to(first.device, non_blocking=True)
        bounds = np.cumsum(offsets)
        meta = device_ints[bounds[0]:bounds[1]].view(len(states), _META_COLUMNS)
        sot_rows, score_rows, free_rows = (device_ints[bounds[i]:bounds[i + 1]] for i in (1, 2, 3))

        raw = torch.cat([tensor.reshape(-1, width) for tensor in logits]).float()  # [rows, width]
        slots = meta[:, _SLOT]
        # scores: the token each row sampled at its previous (free) step, under that step's filtered distribution
        if step.score_rows:
            score_slots = slots.index_select(0, score_rows)
            previous = meta[:, _PREVIOUS].index_select(0, score_rows)
            buffers["sums"].index_add_(0, score_slots, buffers["last"][score_slots, previous])
        # sot-step measurements: openai reads both from the raw logits at the sot position
        if step.sot_rows:
            at_sot = raw.index_select(0, sot_rows).masked_fill(tables["pad"], float("-inf"))
            sot_slots = slots.index_select(0, sot_rows)
            buffers["sums"].index_fill_(0, sot_slots, 0.0)
            if tok.no_speech is not None:
                no_speech = torch.softmax(at_sot, dim=-1)[:, tok.no_speech]
                buffers["no_speech"].index_copy_(0, sot_slots, no_speech)
            languages = torch.softmax(at_sot.index_select(1, tables["language_ids"]), dim=-1)
            buffers["languages"].index_copy_(0, sot_slots, languages)

        kind, forced, flags = meta[:, _KIND:_KIND + 1], meta[:, _FORCED:_FORCED + 1], meta[:, _FLAGS:_FLAGS + 1]
        lower, initial_max = meta[:, _LOWER:_LOWER + 1], meta[:, _INITIAL_MAX:_INITIAL_MAX + 1]
        cols = tables["cols"]

        def has(bit):
            return (flags & bit) != 0

        free = kind == FREE
        timestamps = has(TIMESTAMPS)
        mask = tables["pad"] | (free & tables["suppress"])  # SuppressTokens (+ padded vocabulary columns)
        mask = mask | (has(BLANK) & tables["blank"])  # SuppressBlank
        mask = mask | (timestamps & (cols == tok.no_timestamps))  # ApplyTimestampRules from here
        mask = mask | (has(PAIR_CLOSED) & tables["timestamp"])
        mask = mask | (has(SEGMENT_OPEN) & tables["below_eot"])
        mask = mask | (timestamps & tables["timestamp"] & (cols < lower))
        mask = mask | (has(INITIAL) & (tables["text"] | (cols > initial_max)))
        mask = mask | ((kind == FORCED) & (cols != forced))
        mask = mask | ((kind == AUTO) & ~tables["language"])
        filtered = raw.masked_fill(mask, float("-inf"))
        # auto language: the likeliest language token only (openai's detect_language: argmax over languages)
        best = filtered.argmax(dim=-1, keepdim=True)
        filtered = filtered.masked_fill((kind == AUTO) & (cols != best), float("-inf"))
        # the timestamps' summed probability beats every text token: a timestamp is sampled
        logprobs = torch.log_softmax(filtered, dim=-1)
        timestamp_mass = torch.logsumexp(logprobs[:, tok.timestamp_begin:], dim=-1, keepdim=True)
        best_text = logprobs[:, :tok.timestamp_begin].max(dim=-1, keepdim=True).values
        filtered = filtered.masked_fill(timestamps & (timestamp_mass > best_text) & tables["text"], float("-inf"))
        # openai's sum_logprobs: log_softmax of the filtered logits (no temperature), kept per slot until the
        # next step (or the request's end) says which token was sampled
        if step.free_rows:
            free_logprobs = torch.log_softmax(filtered.index_select(0, free_rows), dim=-1)
            buffers["last"].index_copy_(0, slots.index_select(0, free_rows), free_logprobs)
        out = filtered.to(first.dtype)
        for tensor, row in zip(logits, out.split(1)):
            tensor.copy_(row.view_as(tensor))

    # ---- device tables and buffers -----------------------------------------------------------
    def _ensure_buffers(self, torch, like, width: int) -> None:
        if self._tables is not None and self._tables["width"] == width:
            return
        tok = self.tokens
        cols = like.new_zeros(width, dtype=torch.long)
        cols = cols + torch.arange(width, dtype=torch.long, device=like.device)  # a device tensor like the logits

        def column_mask(ids) -> Any:
            mask = cols < 0
            if len(ids):
                index = torch.as_tensor(np.asarray(sorted(ids), dtype=np.int64)).to(like.device)
                mask = mask.index_fill(0, index, True)
            return mask

        self._tables = {
            "width": width,
            "cols": cols[None, :],
            "pad": (cols >= tok.vocab_size)[None, :],
            "suppress": column_mask(tok.suppress)[None, :],
            "blank": column_mask(tok.blank)[None, :],
            "language": column_mask(tok.language_ids)[None, :],
            "language_ids": torch.as_tensor(np.asarray(tok.language_ids or [tok.eot], dtype=np.int64)).to(
                like.device),
            "timestamp": ((cols >= tok.timestamp_begin) & (cols < tok.vocab_size))[None, :],
            "text": (cols < tok.timestamp_begin)[None, :],
            "below_eot": (cols < tok.eot)[None, :],
        }
        self._buffers = None
        self._like = like
        self._grow(self._capacity)

    def _grow(self, capacity: int) -> None:
        """Per-slot device buffers; growing copies the old rows on the device (no host round trip)."""
        if self._tables is None:
            self._capacity = capacity
            return
        torch = self._import_torch()
        like, width = self._like, self._tables["width"]
        languages = max(1, len(self.tokens.language_ids))
        fresh = {
            "sums": like.new_zeros(capacity, dtype=torch.float32),
            "no_speech": like.new_zeros(capacity, dtype=torch.float32),
            "languages": like.new_zeros((capacity, languages), dtype=torch.float32),
            "last": like.new_zeros((capacity, width), dtype=torch.float32),
        }
        if self._buffers is not None:
            for name, old in self._buffers.items():
                fresh[name][: old.shape[0]].copy_(old)
        self._buffers = fresh
        self._capacity = capacity

    # ---- the request's end: one read ----------------------------------------------------------
    def finish(self, client_id: int, sampled: list[int], ended: bool) -> Measurements:
        """Read one request's measurements (one device-to-host copy) and free its slot.

        `sampled`: its tokens after the forced start sequence, eot excluded; `ended`: it stopped on
        <|endoftext|> (whose log-probability counts, as in openai), else at the length limit (its last
        token's log-probability comes from the last step).
        """
        state = self.state(client_id)
        try:
            if state is not None and state.error is not None:
                raise RuntimeError(f"the Whisper logits processor failed: {state.error}")
            if state is None or state.slot < 0 or self._buffers is None:
                return Measurements(None, None, None)
            torch = self._import_torch()
            buffers, slot = self._buffers, state.slot
            final = self.tokens.eot if ended else (sampled[-1] if sampled else None)
            scored = (not state.plan.detect_only) and final is not None
            with self._stream(torch, state.stream_ptr):
                parts = [buffers["no_speech"][slot:slot + 1], buffers["languages"][slot]]
                if scored:
                    parts.append((buffers["sums"][slot] + buffers["last"][slot, final]).reshape(1))
                values = torch.cat(parts).cpu().tolist()  # the one device-to-host copy of this request
            no_speech = values[0] if self.tokens.no_speech is not None else None
            probs = values[1:1 + max(1, len(self.tokens.language_ids))]
            languages = None
            if self.tokens.language_ids:
                order = np.argsort(-np.asarray(probs), kind="stable")
                languages = {self.tokens.language_codes[i]: float(probs[i]) for i in order}
            return Measurements(values[-1] if scored else None, no_speech, languages)
        finally:
            self.forget(client_id)
