"""Messages on the wire (docs/protocol.md): request and result schemas, and the envelopes.

Decoding is O(body) work, so the service calls :func:`decode` in a worker process, never on the
event loop. Nothing here is ever unpickled or evaluated: bodies are JSON, parsed by orjson.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    with_config,
)
from typing_extensions import TypedDict

from deployflag.errors import InvalidRequest

MAX_FREQUENCY = 10**12  # far above any real count, far below int64 overflow in the pipeline
MAX_ID_LENGTH = 255
# An integer repo id is stored as text in a column of MAX_ID_LENGTH characters, and compared by
# the upstream as a 64-bit integer: keep it within the signed 64-bit range.
MAX_INT_REPO_ID = 2**63 - 1
JSON_CONTENT_TYPES = frozenset({"", "application/json", "text/json", "text/plain"})


def _require_iso_text(value: Any) -> Any:
    # Numbers would be read as epoch seconds; the upstream always sends ISO 8601 text.
    if not isinstance(value, str | datetime):
        raise ValueError("timestamp must be ISO 8601 text")
    return value


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


Timestamp = Annotated[datetime, BeforeValidator(_require_iso_text), AfterValidator(_as_utc)]
Frequency = Annotated[StrictInt, Field(ge=0, le=MAX_FREQUENCY)]
Text = Annotated[StrictStr, Field(min_length=1, max_length=200)]


def storable_text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored as an id (in SQLite and PostgreSQL alike), or None."""
    if len(text) > MAX_ID_LENGTH:
        return f"is longer than {MAX_ID_LENGTH} characters"
    if "\x00" in text:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (a lone surrogate)"
    return None


def _int_or_text(value: Any) -> Any:
    # Said once, plainly, instead of one error per member of the union.
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"must be an integer or text, not {_json_type(value)}")
    if isinstance(value, str) and not value.strip():
        raise ValueError("must not be empty")
    if isinstance(value, int) and not -MAX_INT_REPO_ID <= value <= MAX_INT_REPO_ID:
        raise ValueError("an integer repo_id must fit in 64 bits")
    if isinstance(value, str) and (problem := storable_text_problem(value)):
        raise ValueError(problem)
    return value


def check_storable_ids(request_id: str, repo_id: int | str | None) -> None:
    """Refuse, before anything is written, ids the database would reject (or SQLite would take
    and PostgreSQL refuse): the same answer on both."""
    if problem := storable_text_problem(request_id):
        raise InvalidRequest("bad_request_id", f"the request id {problem}")
    if repo_id is not None:
        try:
            _int_or_text(repo_id)
        except ValueError as exc:
            raise InvalidRequest("invalid_field", f"repo_id: {exc}") from None


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", type(None): "null", float: "a number", list: "a list",
             dict: "an object"}  # fmt: skip
    return names.get(type(value), type(value).__name__)


RepoId = Annotated[
    StrictInt | Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID_LENGTH)],
    BeforeValidator(_int_or_text),
]


# Rows are validated into plain dicts (TypedDicts), not one model object each: on a large
# payload that halves the validation time and saves ~120 MB, and pydantic still checks every
# field and names the row in its errors. Unknown columns are ignored: the upstream adds
# columns over time. Optional fields are always present (None when absent from the input).
_ROW_CONFIG = ConfigDict(extra="ignore")
OptionalText = Annotated[StrictStr | None, Field(default=None)]


@with_config(_ROW_CONFIG)
class AnalysisRun(TypedDict):
    """One ``analysis_run`` row: a run on a branch (the "daily" data)."""

    branch_name: Annotated[StrictStr, Field(max_length=500)]
    base_oid: OptionalText
    created_at: Timestamp
    shortcode: Text
    frequency_detected: Frequency
    issue_type: OptionalText
    severity: OptionalText


@with_config(_ROW_CONFIG)
class HistoricalRun(TypedDict):
    """One ``historical_run`` row: the default branch's history."""

    timestamp: Timestamp
    shortcode: Text
    frequency: Frequency
    issue_type: OptionalText
    severity: OptionalText


class TrainingRequest(BaseModel):
    """The training request (docs/protocol.md); field names are the upstream's."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    repo_id: RepoId
    default_branch_name: StrictStr | None = None
    analysis_run: list[AnalysisRun]
    historical_run: list[HistoricalRun]


# --- the result (docs/protocol.md) ---------------------------------------------------------------


class Score(BaseModel):
    issue_shortcode: str
    issue_weight: int
    fix_probability: float
    daily_weighted_fix_rate: float
    historical_weighted_fix_rate: float
    severity_score: int
    # Forecast scoring: the smoothed fix rate; null under seed scoring, which has none.
    fix_rate: float | None = None
    # How many events the shortcode had (of the scoring that produced the result).
    events: int = 0


class ModelReport(BaseModel):
    trained: bool
    skipped_reason: str | None = None
    estimator: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    roc_auc: float | None = None
    precision: float | None = None
    training_rows: int = 0
    training_seconds: float = 0.0
    # Forecast scoring only (null under seed): the recency half-life in days (null: none), the
    # model's share in the weight, and the recency backtest's Spearman (null: not run or too
    # little data for it).
    half_life_days: float | None = None
    blend_weight: float | None = None
    backtest_spearman: float | None = None


Scoring = Literal["forecast", "seed"]


class Computation(BaseModel):
    """What the pure pipeline returns for one request."""

    repo_id: int | str
    # Results stored before the forecast scoring existed were computed by the seed scoring.
    scoring: Scoring = "seed"
    scores: list[Score]
    model: ModelReport


class TrainingResult(Computation):
    """The JSON reply: the computation plus who asked, which build answered, and when."""

    request_id: str
    status: Literal["ok"] = "ok"
    deployflag_version: str
    finished_at: datetime


# --- envelopes (docs/protocol.md) ----------------------------------------------------------------

EnvelopeKind = Literal["json", "celery"]


class Envelope(BaseModel):
    """What the service needs to know about a delivery before it computes anything."""

    model_config = ConfigDict(frozen=True)

    kind: EnvelopeKind
    request_id: str
    repo_id: int | str | None = None
    celery_protocol: int | None = None
    body_digest: str | None = None  # SHA-256 of the body, set by the service before the claim


class Decoded(BaseModel):
    envelope: Envelope
    request: Any  # the request object, still unvalidated


def _normalise_id(raw: Any, what: str) -> str | None:
    """A task or message id as text; accepts kombu's JSON form of a ``uuid.UUID``."""
    if isinstance(raw, bytes):  # before the emptiness check: b"" is no id either
        raw = raw.decode("utf-8", "replace")
    if raw is None or raw == "":
        return None
    if isinstance(raw, Mapping) and raw.get("__type__") == "uuid":
        value = raw.get("__value__")
        hex_ = value.get("hex") if isinstance(value, Mapping) else value
        try:
            return str(uuid.UUID(hex=str(hex_)))
        except ValueError:
            raise InvalidRequest("bad_request_id", f"{what} is not a valid uuid") from None
    if isinstance(raw, str | int) and not isinstance(raw, bool):
        if isinstance(raw, int) and not -MAX_INT_REPO_ID <= raw <= MAX_INT_REPO_ID:
            raise InvalidRequest("bad_request_id", f"{what} is an integer beyond 64 bits")
        text = str(raw)
        if problem := storable_text_problem(text):
            raise InvalidRequest("bad_request_id", f"{what} {problem}")
        return text
    raise InvalidRequest("bad_request_id", f"{what} must be text, not {type(raw).__name__}")


def parse_json(body: bytes) -> Any:
    """orjson, with each failure turned into its own park reason."""
    if not body:
        raise InvalidRequest("empty_body", "the message body is empty")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        text = str(exc)
        if "UTF-8" in text:
            raise InvalidRequest("not_utf8", f"body is not UTF-8: {text}") from None
        if "depth limit" in text or "recursion" in text:
            raise InvalidRequest("too_deep", f"JSON nested too deeply: {text}") from None
        raise InvalidRequest("not_json", f"body is not JSON: {text}") from None


def _celery_request(args: Any, kwargs: Any, protocol: int) -> Any:
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise InvalidRequest(
            "bad_celery_body",
            f"Celery protocol {protocol} args must be a list and kwargs an object",
        )
    if args:
        return args[0]
    if "ocave_date" in kwargs:
        return kwargs["ocave_date"]
    raise InvalidRequest(
        "bad_celery_body", "Celery task has no request in args[0] or kwargs['ocave_date']"
    )


def _check_task(name: Any, task_name: str) -> None:
    if name != task_name:
        raise InvalidRequest("unknown_task", f"unknown Celery task {str(name)[:200]!r}")


def _media_type(content_type: str | None) -> str:
    """``application/json; charset=utf-8`` → ``application/json``."""
    return (content_type or "").split(";")[0].strip().lower()


def celery_envelope_from_headers(
    headers: Mapping[str, Any], content_type: str | None, task_name: str
) -> Envelope | None:
    """The envelope of a Celery protocol-2 training task, read from its headers alone.

    Protocol 2 carries the task name and id in the headers, so a large body need not be parsed
    just to learn its request id. None when the headers do not settle it (another envelope, a
    wrong task or id, a content type that is not JSON): then :func:`decode` decides, and says
    why. The repo id, which only the body has, is left unset; the body is still validated in
    full (by :func:`decode`) before anything is computed.
    """
    if headers.get("task") != task_name:
        return None
    if _media_type(content_type) not in JSON_CONTENT_TYPES:
        return None
    try:
        task_id = _normalise_id(headers.get("id"), "task id")
    except InvalidRequest:
        return None
    if task_id is None:
        return None
    return Envelope(kind="celery", request_id=task_id, celery_protocol=2)


def decode(
    body: bytes,
    headers: Mapping[str, Any],
    *,
    message_id: str | None,
    content_type: str | None,
    task_name: str,
) -> Decoded:
    """Recognise the envelope (plain JSON, Celery protocol 2 or 1) and pull out the request.

    Raises :class:`InvalidRequest` for anything that is not one of them.
    """
    ctype = _media_type(content_type)
    if ctype not in JSON_CONTENT_TYPES:
        raise InvalidRequest(
            "unsupported_content_type", f"content type {ctype[:100]!r} is not JSON; refused"
        )
    obj = parse_json(body)
    header_task = headers.get("task")

    if header_task is not None:  # Celery protocol 2: task and id travel in the headers
        _check_task(header_task, task_name)
        if not isinstance(obj, list) or len(obj) not in (2, 3):
            raise InvalidRequest(
                "bad_celery_body", "Celery protocol 2 body must be [args, kwargs, embed]"
            )
        request = _celery_request(obj[0], obj[1], 2)
        task_id = _normalise_id(headers.get("id"), "task id")
        return _decoded("celery", 2, task_id or message_id, body, request)

    if isinstance(obj, dict) and "task" in obj:  # Celery protocol 1: everything in the body
        _check_task(obj.get("task"), task_name)
        request = _celery_request(obj.get("args", []), obj.get("kwargs", {}), 1)
        task_id = _normalise_id(obj.get("id"), "task id")
        return _decoded("celery", 1, task_id or message_id, body, request)

    if isinstance(obj, dict):
        return _decoded("json", None, _normalise_id(message_id, "message_id"), body, obj)
    if isinstance(obj, list):
        raise InvalidRequest(
            "unknown_envelope", "a JSON array without a Celery 'task' header is no known envelope"
        )
    raise InvalidRequest(
        "wrong_type", f"the request must be a JSON object, not {type(obj).__name__}"
    )


def _decoded(
    kind: EnvelopeKind, protocol: int | None, request_id: str | None, body: bytes, request: Any
) -> Decoded:
    # Without any id, the body's hash: a re-sent copy is still recognised as the same request.
    rid = request_id or hashlib.sha256(body).hexdigest()
    repo_id = request.get("repo_id") if isinstance(request, dict) else None
    if not isinstance(repo_id, int | str) or isinstance(repo_id, bool):
        repo_id = None
    check_storable_ids(rid, repo_id)
    envelope = Envelope(kind=kind, request_id=rid, repo_id=repo_id, celery_protocol=protocol)
    return Decoded(envelope=envelope, request=request)


# --- validation ------------------------------------------------------------------------------

_RANGE_ERRORS = {"greater_than_equal", "less_than_equal", "greater_than", "less_than"}


def _reason_for(error_type: str, loc: tuple[Any, ...]) -> str:
    if error_type == "missing":
        return "missing_field"
    if error_type in _RANGE_ERRORS:
        return "out_of_range"
    if error_type.startswith(("datetime", "date", "time")) or (
        loc and loc[-1] in ("created_at", "timestamp")
    ):
        return "invalid_timestamp"
    if error_type == "model_type" and len(loc) <= 1:
        return "wrong_type"
    return "invalid_field"


def _where(loc: tuple[Any, ...]) -> str:
    """('analysis_run', 3, 'created_at') → 'analysis_run[3].created_at'."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in ("int", "str", "function-after[_as_utc(), datetime]"):
            continue  # union/validator branch labels say nothing to a person
        else:
            text += f".{part}" if text else str(part)
    return text or "request"


def validate_request(obj: Any) -> TrainingRequest:
    """Validate a request object; the error names the list, the row index and the field."""
    if not isinstance(obj, dict):
        raise InvalidRequest(
            "wrong_type", f"the request must be a JSON object, not {type(obj).__name__}"
        )
    try:
        return TrainingRequest.model_validate(obj)
    except ValidationError as exc:
        raise _invalid(exc) from None


def check_shortcodes(request: TrainingRequest, cap: int) -> None:
    """Refuse a request with more than ``cap`` distinct shortcodes (0: no cap)."""
    if cap <= 0:
        return
    distinct = {row["shortcode"] for row in request.analysis_run}
    distinct.update(row["shortcode"] for row in request.historical_run)
    if len(distinct) > cap:
        raise InvalidRequest(
            "too_many_shortcodes",
            f"{len(distinct)} distinct shortcodes, more than DEPLOYFLAG_MAX_SHORTCODES ({cap})",
        )


def parse_request(body: bytes) -> TrainingRequest:
    """A plain JSON request body → a validated request.

    pydantic reads the bytes itself: no intermediate dicts, so a large payload needs less memory
    and time than parsing first. Only when the bytes are not JSON does orjson parse them, to give
    the precise reason (not_json, not_utf8, too_deep, empty_body).
    """
    try:
        return TrainingRequest.model_validate_json(body)
    except ValidationError as exc:
        if any(error["type"] == "json_invalid" for error in exc.errors()):
            parse_json(body)  # raises with the precise reason
        raise _invalid(exc) from None


def _invalid(exc: ValidationError) -> InvalidRequest:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    loc = tuple(first["loc"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    text = first["msg"].removeprefix("Value error, ")
    return InvalidRequest(_reason_for(first["type"], loc), f"{_where(loc)}: {text}{more}")


# --- replies (docs/protocol.md) ------------------------------------------------------------------

CELERY_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_REPLY_NAMESPACE = uuid.UUID("6f1d3a52-5e0c-4c1e-9a37-0d2b1f6d8e11")


class Reply(BaseModel):
    """A reply ready to publish: body bytes, AMQP headers and content type."""

    model_config = ConfigDict(frozen=True)

    body: bytes
    headers: dict[str, Any]
    content_type: str = "application/json"


def reply_task_id(request_id: str) -> str:
    """A stable Celery task id per request: a re-published result carries the same id."""
    return str(uuid.uuid5(_REPLY_NAMESPACE, request_id))


def encode_reply(
    result: TrainingResult,
    kind: EnvelopeKind,
    *,
    reply_format: Literal["auto", "json", "celery"],
    task_name: str,
    origin: str,
) -> Reply:
    """The reply to a request that came in a ``kind`` envelope: the same kind unless
    ``reply_format`` names one."""
    form = kind if reply_format == "auto" else reply_format
    if form == "celery":
        return encode_celery_reply(result, task_name, origin)
    return encode_json_reply(result)


def encode_json_reply(result: TrainingResult) -> Reply:
    return Reply(body=orjson.dumps(result.model_dump(mode="json")), headers={})


def encode_celery_reply(result: TrainingResult, task_name: str, origin: str) -> Reply:
    """A Celery protocol-2 task message that a stock Celery worker executes.

    Celery needs the JSON content type and the full three-element body; without them its worker
    crashes on the message, and again on every restart, as the message stays queued.
    """
    kwargs = {
        "deployflag_results": [
            {"issue_shortcode": s.issue_shortcode, "issue_weight": s.issue_weight}
            for s in result.scores
        ],
        "repo_id": result.repo_id,
    }
    task_id = reply_task_id(result.request_id)
    headers: dict[str, Any] = {
        "lang": "py",
        "task": task_name,
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "eta": None,
        "expires": None,
        "timelimit": [None, None],
        "argsrepr": "()",
        "kwargsrepr": f"{{'repo_id': {result.repo_id!r}, 'deployflag_results': "
        f"<{len(result.scores)} scores>}}",
        "origin": origin,
        "ignore_result": True,
    }
    return Reply(body=orjson.dumps([[], kwargs, CELERY_EMBED]), headers=headers)
