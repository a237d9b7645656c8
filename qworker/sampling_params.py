"""Sampling parameters for one request, validated on construction (vLLM's names)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields

# Hard ceilings that protect a worker from absurd requests; a job asking for more gets an
# error naming the limit instead of tying up a GPU slot for hours.
MAX_TOKENS_LIMIT = 1_000_000
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MAX_STOP_TOKEN_IDS = 256


@dataclass(slots=True)
class SamplingParams:
    """How to sample one request's output.

    Defaults follow vLLM: temperature 1.0, top_p 1.0, top_k off (0 or -1), max_tokens 16.
    temperature 0 means greedy. ``seed`` makes sampling reproducible: the random draw for a
    token depends only on (seed, position), never on the batch or on preemption.
    An invalid value raises ``ValueError`` naming the field and the allowed range.
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = _as_list("stop", self.stop, "a string or a list of strings")
        self.stop_token_ids = _as_list("stop_token_ids", self.stop_token_ids,
                                       "a list of token ids")
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: object) -> bool:
            return (isinstance(v, (int, float)) and not isinstance(v, bool)
                    and math.isfinite(v))

        if self.max_tokens is not None and (
                not is_int(self.max_tokens) or not 1 <= self.max_tokens <= MAX_TOKENS_LIMIT):
            raise bad("max_tokens", f"must be an integer in [1, {MAX_TOKENS_LIMIT}] or None")
        if not is_num(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a finite number >= 0 (0 is greedy)")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "must be an integer >= 1, or 0 / -1 to disable")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not is_num(self.repetition_penalty) or not 0 < self.repetition_penalty <= 10:
            raise bad("repetition_penalty", "must be in (0, 10] (1.0 is off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not is_num(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise bad(name, "must be in [-2, 2] (0 is off)")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise bad("seed", "must be an integer in [0, 2**63) or None")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "must be a boolean")
        if not isinstance(self.skip_special_tokens, bool):
            raise bad("skip_special_tokens", "must be a boolean")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if len(self.stop) > MAX_STOP_STRINGS or not all(
                isinstance(s, str) and 0 < len(s) <= MAX_STOP_STRING_LEN for s in self.stop):
            raise bad("stop", f"must be at most {MAX_STOP_STRINGS} non-empty strings of at "
                              f"most {MAX_STOP_STRING_LEN} characters")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS or not all(
                is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", f"must be at most {MAX_STOP_TOKEN_IDS} token ids >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5      # the sampler's own threshold, as in vLLM

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The names a job's `params` map may use."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, params: Mapping) -> SamplingParams:
        """Build from a plain mapping (a wire job's `params`); unknown keys are an error."""
        if not isinstance(params, Mapping):
            raise ValueError(f"sampling params must be a map of name -> value, "
                             f"got {type(params).__name__}")
        unknown = sorted(map(repr, set(params) - set(cls.field_names())))
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {', '.join(unknown)}; "
                             f"allowed: {sorted(cls.field_names())}")
        try:
            return cls(**params)
        except TypeError as e:  # defensive: a value a check above did not foresee
            raise ValueError(f"invalid sampling parameters: {e}") from None

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _as_list(name: str, value: object, what: str) -> list:
    """None -> []; a list, tuple or other plain iterable -> a list; anything else is an error."""
    if value is None:
        return []
    if not isinstance(value, Iterable) or isinstance(value, (str, bytes, bytearray, Mapping)):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return list(value)
