"""Wire protocol v1: job, event and result maps, msgpack with limits, validation.

Everything that crosses Redis is a msgpack map. Unpacking is bounded (total size, string,
array and map lengths, nesting depth); no pickle anywhere. A bad job raises
``JobError(code, message)``; ``JobError.job_id`` carries the job's id when the payload
had a usable one, so the producer can still be told what went wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import msgpack

from qworker.sampling_params import SamplingParams

VERSION = 1
ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
FINISH_REASONS = ("stop", "length", "cancelled", "expired", "error")

MAX_JOB_BYTES = 1 << 20          # a whole job payload
MAX_CONTAINER_LEN = 1 << 17      # any one array or map (prompt_token_ids included)
MAX_NESTING = 8                  # job map -> messages -> message -> content parts
MAX_MESSAGES = 1024
MAX_TENANT_LEN = 128
INT32 = 2**31

JOB_FIELDS = ("v", "id", "prompt", "messages", "prompt_token_ids", "params", "priority",
              "deadline_ms", "tenant", "submitted_ms")


class JobError(Exception):
    """A job that cannot run: ``code`` is stable and machine-readable, ``message`` tells a
    person what to change. Codes: invalid_payload, unsupported_version, invalid_job,
    invalid_params, invalid_prompt, prompt_too_long, too_many_deliveries, internal."""

    def __init__(self, code: str, message: str, job_id: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.job_id = job_id

    def to_map(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def pack(obj: Any) -> bytes:
    """msgpack-encode a wire map (str as str, bytes as bin)."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack(raw: bytes, max_bytes: int = MAX_JOB_BYTES) -> Any:
    """Decode one msgpack object with hard limits; raises JobError(invalid_payload)."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise JobError("invalid_payload", f"expected msgpack bytes, got {type(raw).__name__}")
    if len(raw) > max_bytes:
        raise JobError("invalid_payload",
                       f"payload is {len(raw)} bytes; the limit is {max_bytes} bytes")
    try:
        u = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=max_bytes,
                             max_str_len=max_bytes, max_bin_len=max_bytes,
                             max_array_len=MAX_CONTAINER_LEN, max_map_len=MAX_CONTAINER_LEN,
                             max_ext_len=0)
        u.feed(bytes(raw))
        obj = u.unpack()
        if u.tell() != len(raw):
            raise ValueError(f"{len(raw) - u.tell()} bytes of extra data after the object")
    except UnicodeDecodeError:
        raise JobError("invalid_payload", "a msgpack string is not valid UTF-8") from None
    except msgpack.OutOfData:
        raise JobError("invalid_payload", "not a msgpack object: truncated or empty") from None
    except Exception as e:  # FormatError, StackError, ExtraData, ValueError, ...
        raise JobError("invalid_payload", f"not a msgpack object: {type(e).__name__}: "
                       f"{str(e)[:120]}") from None
    _check_depth(obj)
    return obj


def _check_depth(obj: Any) -> None:
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if d > MAX_NESTING:
            raise JobError("invalid_payload", f"payload nests deeper than {MAX_NESTING} levels")
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o if isinstance(v, (dict, list)))


@dataclass(slots=True)
class Job:
    """A validated job. Exactly one of prompt / messages / prompt_token_ids is set."""

    id: str
    params: SamplingParams
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    prompt_token_ids: list[int] | None = None
    priority: int = 0
    deadline_ms: int | None = None
    tenant: str | None = None
    submitted_ms: int | None = None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def peek_id(obj: Any) -> str | None:
    """The job id of a (possibly invalid) decoded payload, when it is usable."""
    if isinstance(obj, dict):
        jid = obj.get("id")
        if isinstance(jid, str) and ID_PATTERN.fullmatch(jid):
            return jid
    return None


def decode_job(raw: bytes, max_bytes: int = MAX_JOB_BYTES) -> Job:
    """Bytes of a stream entry's ``job`` field -> Job, or JobError with a usable message."""
    obj = unpack(raw, max_bytes)
    try:
        return validate_job(obj)
    except JobError as e:
        e.job_id = peek_id(obj)
        raise


def validate_job(obj: Any) -> Job:
    """Check a decoded job map against protocol v1 (see docs/protocol.md)."""
    if not isinstance(obj, dict):
        raise JobError("invalid_job", f"a job must be a msgpack map, got {type(obj).__name__}")
    if obj.get("v") != VERSION:
        raise JobError("unsupported_version",
                       f"protocol version v={obj.get('v')!r} is not supported; send v={VERSION}")
    unknown = sorted(str(k) for k in obj if k not in JOB_FIELDS)
    if unknown:
        raise JobError("invalid_job", f"unknown job field(s) {unknown}; allowed: {list(JOB_FIELDS)}")
    jid = obj.get("id")
    if not isinstance(jid, str) or not ID_PATTERN.fullmatch(jid):
        raise JobError("invalid_job", "id must be a string of 1-128 characters from "
                       f"[A-Za-z0-9._:-], got {str(jid)[:40]!r}")
    given = [k for k in ("prompt", "messages", "prompt_token_ids") if obj.get(k) is not None]
    if len(given) != 1:
        raise JobError("invalid_job", "give exactly one of prompt, messages, prompt_token_ids; "
                       f"got {given or 'none'}")
    job = Job(id=jid, params=_params(obj.get("params")))
    if "prompt" in given:
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise JobError("invalid_prompt", "prompt must be a non-empty string")
        job.prompt = obj["prompt"]
    elif "messages" in given:
        job.messages = _messages(obj["messages"])
    else:
        ids = obj["prompt_token_ids"]
        # type() is int: not a bool; set/min run in C (a prompt is up to ~100k ids, and the
        # feeder validates a burst of them while the engine loop wants the GIL)
        if not isinstance(ids, list) or not ids or set(map(type, ids)) != {int} or min(ids) < 0:
            raise JobError("invalid_prompt",
                           "prompt_token_ids must be a non-empty array of integers >= 0")
        job.prompt_token_ids = ids
    pri = obj.get("priority", 0)
    if not _is_int(pri) or not -INT32 <= pri < INT32:
        raise JobError("invalid_job", f"priority must be a 32-bit integer, got {pri!r}")
    job.priority = pri
    for name in ("deadline_ms", "submitted_ms"):
        v = obj.get(name)
        if v is not None and (not _is_int(v) or not 0 < v < 2**53):
            raise JobError("invalid_job", f"{name} must be Unix time in milliseconds, got {v!r}")
        setattr(job, name, v)
    tenant = obj.get("tenant")
    if tenant is not None and (not isinstance(tenant, str) or len(tenant) > MAX_TENANT_LEN):
        raise JobError("invalid_job", f"tenant must be a string of at most {MAX_TENANT_LEN} chars")
    job.tenant = tenant
    return job


def _params(params: Any) -> SamplingParams:
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise JobError("invalid_params", f"params must be a map, got {type(params).__name__}")
    try:
        return SamplingParams.from_dict(params)
    except (ValueError, TypeError) as e:
        raise JobError("invalid_params", str(e)) from None


def _messages(msgs: Any) -> list[dict[str, Any]]:
    if not isinstance(msgs, list) or not msgs or len(msgs) > MAX_MESSAGES:
        raise JobError("invalid_prompt",
                       f"messages must be a non-empty array of at most {MAX_MESSAGES} maps")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise JobError("invalid_prompt", f"messages[{i}] must be a map with string "
                           "'role' and string 'content'")
    return msgs


@dataclass(slots=True)
class Event:
    """One event of a job's stream (live on ``out:{id}``, replayable from ``log:{id}``)."""

    id: str
    seq: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    error: dict[str, str] | None = None
    usage: dict[str, int] | None = None
    timings: dict[str, float] | None = None

    def to_map(self) -> dict[str, Any]:
        m: dict[str, Any] = {"id": self.id, "seq": self.seq, "token_ids": self.token_ids,
                             "text": self.text, "finished": self.finished,
                             "finish_reason": self.finish_reason, "error": self.error}
        if self.usage is not None:
            m["usage"] = self.usage
        if self.timings is not None:
            m["timings"] = self.timings
        return m

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> Event:
        return cls(id=m["id"], seq=m["seq"], token_ids=list(m.get("token_ids") or []),
                   text=m.get("text") or "", finished=bool(m.get("finished")),
                   finish_reason=m.get("finish_reason"), error=m.get("error"),
                   usage=m.get("usage"), timings=m.get("timings"))


@dataclass(slots=True)
class Result:
    """The final result of a job, stored once at ``result:{id}``."""

    id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    error: dict[str, str] | None = None
    usage: dict[str, int] | None = None
    timings: dict[str, float] | None = None

    def to_map(self) -> dict[str, Any]:
        return {"id": self.id, "token_ids": self.token_ids, "text": self.text,
                "finish_reason": self.finish_reason, "error": self.error,
                "usage": self.usage, "timings": self.timings}

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> Result:
        return cls(id=m["id"], token_ids=list(m.get("token_ids") or []),
                   text=m.get("text") or "", finish_reason=m["finish_reason"],
                   error=m.get("error"), usage=m.get("usage"), timings=m.get("timings"))


def log_entry_id(seq: int) -> str:
    """Replay-log entry id of event ``seq``: ``0-(seq+1)``, so XADD refuses a duplicate seq."""
    return f"0-{seq + 1}"


def seq_of_entry_id(entry_id: bytes | str) -> int:
    s = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(s.split("-", 1)[1]) - 1
