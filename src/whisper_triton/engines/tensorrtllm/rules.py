"""Whisper's rules as the runtime's per-step logits processors (one per batch slot)."""

from __future__ import annotations

import contextlib
import logging

import numpy as np

from ..whisper_rules import RequestState

logger = logging.getLogger(__name__)

PROCESSOR_PREFIX = "whisper_rules_"


# ---- the logits hook ---------------------------------------------------------------------------
class ProcessorSlots:
    """One logits processor per batch slot; before each `generate` the engine puts each request's state in its slot.

    The runtime's processor map is fixed at `from_dir`, and a processor learns only the executor's
    request id (assigned inside `generate`) and the token history, not which of our requests it is
    serving. Naming slot i's processor for request i of the batch (`logits_processor_names`) binds
    them without guessing; the engine runs one `generate` at a time (a lock), so a slot holds one
    request at a time.
    """

    def __init__(self, size: int, vocab_size: int):
        self.names = [f"{PROCESSOR_PREFIX}{slot}" for slot in range(size)]
        self.vocab_size = vocab_size
        self.states: list[RequestState | None] = [None] * size
        self.prompt_lengths = [0] * size
        self.errors: list[str] = []

    def processor_map(self) -> dict:
        return {name: TorchLogitsProcessor(self, slot) for slot, name in enumerate(self.names)}

    @contextlib.contextmanager
    def bound(self, states: list[RequestState], prompts: list[list[int]]):
        """Put the batch's states in slots 0..B-1 for the duration of one `generate`."""
        if len(states) > len(self.states):
            raise ValueError(f"a batch of {len(states)} is above the {len(self.states)} processor slots")
        self.errors.clear()
        for slot, (state, prompt) in enumerate(zip(states, prompts)):
            self.states[slot], self.prompt_lengths[slot] = state, len(prompt)
        try:
            yield self.names[: len(states)]
        finally:
            self.states = [None] * len(self.states)
        if self.errors:
            raise RuntimeError(f"the Whisper logits processor failed: {self.errors[0]}")


class TorchLogitsProcessor:
    """The runtime's processor callback: `(request_id, logits, token_ids, stream_ptr, client_id)`.

    `logits` is the request's [1, beams, vocab_padded] tensor on the GPU, changed in place before
    sampling; `token_ids` holds, per beam, the prompt and the tokens so far; `stream_ptr` is the
    executor's CUDA stream (work on the tensor must be ordered on it). The rules run in numpy on a
    host copy of the rows (a [beams, vocab] copy each way per step).
    """

    def __init__(self, slots: ProcessorSlots, slot: int):
        self.slots = slots
        self.slot = slot

    def __call__(self, request_id, logits, token_ids, stream_ptr, client_id) -> None:
        state = self.slots.states[self.slot]
        if state is None:
            return
        try:
            self._apply(state, logits, token_ids, stream_ptr)
        except Exception as exc:  # raising into the executor's thread would take the runtime down
            logger.exception("Whisper logits processor failed on request %s", request_id)
            self.slots.errors.append(f"{type(exc).__name__}: {exc}")

    def _apply(self, state: RequestState, logits, token_ids, stream_ptr) -> None:
        import torch

        stream = torch.cuda.ExternalStream(stream_ptr) if stream_ptr is not None and logits.is_cuda else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            width = logits.shape[-1]
            host = logits.detach().reshape(-1, width).float().cpu().numpy().copy()
            vocab = min(self.slots.vocab_size, width)
            prompt_length = self.slots.prompt_lengths[self.slot]
            histories = [list(beam)[prompt_length:] for beam in token_ids]
            if len(histories) != host.shape[0]:
                # e.g. one context-step row for several beams that share the prompt: the rows lead
                histories = (histories + histories[-1:] * host.shape[0])[: host.shape[0]]
            rows = host[:, :vocab]
            state.step(rows, histories)
            host[:, :vocab] = rows
            host[:, vocab:] = -np.inf  # padded vocabulary columns are never tokens
            logits.copy_(torch.from_numpy(host).reshape(logits.shape).to(device=logits.device, dtype=logits.dtype))


