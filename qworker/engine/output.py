"""OutputProcessor: incremental detokenization and stop strings, per request.

Detokenization follows vLLM's prefix/read offsets: each step decodes only a short window
of tokens (``ids[prefix_offset:]``) and emits the text beyond ``decode(ids[prefix_offset:
read_offset])``; while the window's text ends in U+FFFD (a UTF-8 character split across
tokens) nothing is emitted. The deltas of a request concatenate to exactly
``tokenizer.decode(output_ids, skip_special_tokens=...)`` (truncated before a stop string).

With a Hugging Face fast tokenizer (and no ``clean_up_tokenization_spaces``) the same
text comes from the Rust ``tokenizers.decoders.DecodeStream``, one call per token,
2.6-3.1x cheaper than the two window decodes (``scripts/bench_detokenize.py``: 0.66-0.80
vs 1.73-2.48 ms a step of 256 requests on this project's 2-core CPU); a character still
incomplete when the request finishes is flushed from one full decode of its output.

Stop strings are never leaked: the longest tail of the text that could still grow into a
stop string is held back, and released when it turns out not to be one or when the
request finishes for another reason. Tokens are detokenized one at a time, so what has
been emitted after a list of tokens does not depend on how the tokens were batched; a
resumed request replays its already-emitted tokens to rebuild exactly that state, and,
given the text the earlier run actually emitted, holds back exactly what that run had not
sent yet (so a run that held back more or less than this one loses and repeats nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qworker.sampling_params import SamplingParams

try:
    from tokenizers import Tokenizer as _RustTokenizer
    from tokenizers.decoders import DecodeStream
except ImportError:             # an old tokenizers: the window decodes serve everyone
    _RustTokenizer = DecodeStream = None

_REPLACEMENT = "\ufffd"


def _stream_backend(tokenizer: Any) -> Any:
    """The Rust tokenizer under a HF fast tokenizer whose ``decode`` is exactly its own
    (no Python clean-up of spaces), or None: then the window decodes are used."""
    rust = getattr(tokenizer, "_tokenizer", None)
    if (DecodeStream is None or not isinstance(rust, _RustTokenizer)
            or getattr(tokenizer, "clean_up_tokenization_spaces", False)):
        return None
    return rust


@dataclass(slots=True)
class _RequestText:
    """Detokenization state of one request."""

    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)   # output ids so far
    prefix_offset: int = 0     # window start: decode(ids[prefix:read]) was emitted text
    read_offset: int = 0       # tokens up to here are emitted (or held for stop strings)
    held: str = ""             # decoded text held back: could be the start of a stop string
    stopped: bool = False
    stream: Any = None         # DecodeStream (fast tokenizers); offsets then unused
    streamed: int = 0          # characters the stream has produced
    incomplete: bool = False   # the stream holds bytes of a character not yet complete


class OutputProcessor:
    """Turns each request's new token ids into text deltas and detects stop strings."""

    def __init__(self, tokenizer: Any) -> None:
        """tokenizer: a Hugging Face tokenizer (anything with ``decode(ids, skip_special_tokens)``)."""
        self.tokenizer = tokenizer
        self._rust = _stream_backend(tokenizer)
        self._requests: dict[str, _RequestText] = {}

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int],
                    params: SamplingParams, output_token_ids: Sequence[int] = (),
                    emitted_text: str | None = None) -> None:
        """Start tracking a request.

        The text is the decode of the output ids alone (the prompt is not part of it).
        ``output_token_ids`` are tokens already emitted by an earlier run of a resumed job:
        they prime the state (including text held back for stop strings) and are never
        emitted again. ``emitted_text`` is the text that run emitted for them (its deltas
        joined, e.g. from the replay log): whatever of their decoded text lies beyond it is
        held, to be emitted (or cut at a stop string) like text held back here. When the
        decode does not start with it (another tokenizer version), nothing is held.
        """
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already being processed")
        state = _RequestText(params)
        if self._rust is not None:
            state.stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
        if output_token_ids:
            replayed, stopped = self._advance(state, list(output_token_ids), finished=False)
            if emitted_text is not None and not stopped:
                text = replayed + state.held          # all their text decoded so far
                state.held = text[len(emitted_text):] if text.startswith(emitted_text) else ""
        self._requests[request_id] = state

    def process(self, request_id: str, new_token_ids: Sequence[int],
                finished: bool) -> tuple[str, bool]:
        """Feed a request's new tokens; return ``(text_delta, stop_string_hit)``.

        ``finished``: the request ends with these tokens for another reason (eos, stop
        token, length), so any held-back text is flushed. On a stop string the text is
        truncated before it and ``stop_string_hit`` is True; later calls return ``("", True)``.
        """
        try:
            state = self._requests[request_id]
        except KeyError:
            raise KeyError(f"unknown request {request_id!r}: add_request it first") from None
        return self._advance(state, new_token_ids, finished)

    def remove(self, request_id: str) -> None:
        """Forget a request (finished or aborted); unknown ids are ignored."""
        self._requests.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    # -- mechanics ---------------------------------------------------------------------

    def _advance(self, state: _RequestText, new_token_ids: Sequence[int],
                 finished: bool) -> tuple[str, bool]:
        if state.stopped:
            return "", True
        text = state.held
        for token_id in new_token_ids:
            state.token_ids.append(token_id)
            text += self._decode_step(state, flush=False)
        if finished:
            text += self._decode_step(state, flush=True)
        stops = state.params.stop
        if stops:
            # A stop string cannot start in text already emitted (it would have been held).
            hits = [i for i in (text.find(s) for s in stops) if i >= 0]
            if hits:
                state.stopped, state.held = True, ""
                return text[:min(hits)], True
            if not finished:
                keep = len(text) - _partial_stop_len(text, stops)
                state.held = text[keep:]
                return text[:keep], False
        state.held = ""
        return text, False

    def _decode_step(self, state: _RequestText, flush: bool) -> str:
        """Text that the tokens beyond ``read_offset`` add; "" while a character is split
        across tokens (the decode ends in U+FFFD), unless ``flush``."""
        ids = state.token_ids
        if state.read_offset == len(ids) and not (flush and state.incomplete):
            return ""
        if state.stream is not None:
            return self._stream_step(state, flush)
        skip = state.params.skip_special_tokens
        prefix_text = self.tokenizer.decode(ids[state.prefix_offset:state.read_offset],
                                            skip_special_tokens=skip)
        new_text = self.tokenizer.decode(ids[state.prefix_offset:], skip_special_tokens=skip)
        if len(new_text) <= len(prefix_text) or (
                new_text.endswith(_REPLACEMENT) and not flush):
            return ""
        state.prefix_offset, state.read_offset = state.read_offset, len(ids)
        return new_text[len(prefix_text):]

    def _stream_step(self, state: _RequestText, flush: bool) -> str:
        """``_decode_step`` through the request's DecodeStream."""
        ids = state.token_ids
        text = ""
        for token_id in ids[state.read_offset:]:
            chunk = state.stream.step(self._rust, token_id)
            state.incomplete = chunk is None
            if chunk:
                text += chunk
        state.read_offset = len(ids)
        state.streamed += len(text)
        if flush and state.incomplete:      # what the stream still holds, as decode() has it
            full = self.tokenizer.decode(ids, skip_special_tokens=state.params.skip_special_tokens)
            text += full[state.streamed:]
            state.streamed, state.incomplete = len(full), False
        return text


def _partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        start = max(0, len(text) - len(stop) + 1)   # a full match was handled already
        i = text.find(stop[0], start)
        while i != -1 and len(text) - i > best:
            if stop.startswith(text[i:]):
                best = len(text) - i
                break
            i = text.find(stop[0], i + 1)
    return best
