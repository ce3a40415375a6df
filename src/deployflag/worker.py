"""What runs inside the pool's worker processes: decode, validate, compute.

Every function here is module-level and picklable, takes raw bytes, and returns small objects:
the event loop never parses a large body. The initializer imports numpy and scikit-learn once per
process and caps their threads, so N workers never run N × cores threads. :func:`process` also
runs in the service process itself, for a lone small request, once :func:`prepare_compute` has
run there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import mmap
import os
import pickle
import resource
import select
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import structlog

from deployflag import logs
from deployflag.errors import InvalidRequest
from deployflag.messages import (
    MAX_ID_LENGTH,
    Computation,
    Decoded,
    Envelope,
    TrainingRequest,
    check_shortcodes,
    decode,
    parse_request,
    validate_request,
)
from deployflag.pipeline.config import PipelineConfig

_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_PR_SET_PDEATHSIG = 1
_limits: Any = None  # keeps threadpoolctl's limit alive for the life of the process
_memory_limited = False  # set by init_worker when RLIMIT_AS is in force
_max_shortcodes = 0  # DEPLOYFLAG_MAX_SHORTCODES, set by init_worker (0: no cap)

# Address space needed per byte of body, measured on synthetic payloads with
# benchmarks/worker_memory.py (docs/faults.md). Decoding with orjson peaks at about 15 x the body
# (its document tree plus the Python objects); a request whose body is the plain JSON request is
# validated by pydantic straight from the bytes instead, at about 6.3 x, compute included. Under
# RLIMIT_AS orjson and pydantic-core (Rust) crash the process instead of raising MemoryError when
# an allocation fails, so the room is checked before they run: a request that cannot fit is
# parked as memory_limit at once.
PARSE_SPACE_FACTOR = 16
REQUEST_SPACE_FACTOR = 20  # decode, then validate the decoded objects (Celery envelopes)
JSON_REQUEST_SPACE_FACTOR = 8  # validate the body's bytes directly (plain JSON)
MEMORY_LIMIT_MESSAGE = "the request needs more memory than DEPLOYFLAG_WORKER_MEMORY_LIMIT"


def cap_threads() -> None:
    """One BLAS/OpenMP thread per process; call before numpy/scikit-learn are imported."""
    for name in _THREAD_ENV:
        os.environ[name] = "1"


def init_worker(
    log_format: str,
    log_level: str,
    memory_limit: int,
    service_pid: int | None = None,
    max_shortcodes: int = 0,
) -> None:
    """Set up a worker process: logging, one thread, heavy imports, then the address-space limit."""
    cap_threads()
    _die_with_parent()
    if service_pid is not None:
        _exit_with_service(service_pid)
    # The service drains on SIGTERM/SIGINT and then stops its workers itself; a Ctrl-C or a
    # supervisor's signal to the whole process group must not kill jobs mid-drain.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a hang-up drains the service like SIGTERM
    logs.configure(log_format, log_level)
    prepare_compute(max_shortcodes)
    if memory_limit > 0:
        global _memory_limited
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
        _memory_limited = True


def prepare_compute(max_shortcodes: int) -> None:
    """What a process needs before it runs :func:`process`: the shortcode cap, the heavy imports
    and one native thread. A worker calls it from :func:`init_worker`; the service calls it for
    the lone small jobs it computes itself (never with the memory limit, which would bound the
    whole service)."""
    global _limits, _max_shortcodes
    _max_shortcodes = max_shortcodes
    cap_threads()
    from threadpoolctl import threadpool_limits

    import deployflag.pipeline.forecast  # noqa: F401  (numpy, scikit-learn: once, not per message)

    # threadpool_limits only caps libraries already loaded: hence after the imports.
    _limits = threadpool_limits(limits=1)


def ensure_room(nbytes: int) -> None:
    """Raise MemoryError unless ``nbytes`` more of address space fit under the memory limit.

    An anonymous mapping is reserved and released at once: it counts against RLIMIT_AS but
    touches no page, so the check costs two system calls.
    """
    if not _memory_limited or nbytes <= 0:
        return
    try:
        with mmap.mmap(-1, nbytes):
            pass
    except (OSError, OverflowError, ValueError):
        raise MemoryError(f"no room for {nbytes} more bytes under the memory limit") from None


def _exit_with_service(pid: int) -> None:
    """Exit as soon as the service process ``pid`` has ended, however it ended.

    A forkserver worker's parent is the forkserver, not the service, and the forkserver only
    exits when every holder of its "alive" pipe has closed it — the workers hold it too. So when
    the service dies without stopping its pool (SIGKILL of the service alone, a crash, the
    immediate exit on a second SIGTERM), forkserver, workers and resource tracker would all wait
    forever. A thread waits on a pidfd of the service instead (or polls on systems without
    pidfd_open) and ends the worker; the forkserver and the resource tracker then see their
    pipes close and exit too.
    """

    def watch() -> None:
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # not Linux ≥ 5.3: poll
            while _alive(pid):
                time.sleep(1.0)
        else:
            select.select([fd], [], [])  # readable once the process has exited
        os._exit(1)

    if _alive(pid):
        threading.Thread(target=watch, name="deployflag-service-watch", daemon=True).start()
    else:
        os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the process that forked it dies (no orphans that train
    on after the service was killed)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pool's own EOF handling still applies
        pass


def ping() -> int:
    """Warm-up and liveness probe: the pid of the worker that answered."""
    return os.getpid()


@dataclass(frozen=True)
class Job:
    """What a worker needs of an AMQP delivery: small, picklable, no channel attached.

    ``envelope``: what the event loop already recognised (from a small body or the headers), so
    the worker does not parse the body again to rediscover it.
    """

    body: bytes
    headers: Mapping[str, Any]
    message_id: str | None
    content_type: str | None
    envelope: Envelope | None = None
    presumed: bool = False  # the envelope was inferred from the properties, not decoded


class EnvelopeMismatch(Exception):
    """A body presumed to be a plain JSON request turned out to be another envelope."""

    def __init__(self, envelope: Envelope) -> None:
        super().__init__(f"the body is a {envelope.kind} envelope")
        self.envelope = envelope

    def __reduce__(self) -> tuple[type[EnvelopeMismatch], tuple[Envelope]]:
        return (type(self), (self.envelope,))


def presume_json(job: Job) -> Envelope | None:
    """The envelope of a large body without a Celery task header, from its properties alone:
    a plain JSON request under its message id. None when there is no usable id.

    The body is then parsed once, by :func:`process`, instead of once to learn its envelope and
    again to validate it. Should it not validate, :func:`process` decodes it to find out what it
    is (a Celery protocol-1 message raises :class:`EnvelopeMismatch`).
    """
    rid = job.message_id
    if "task" in job.headers or not rid or len(rid) > MAX_ID_LENGTH:
        return None
    return Envelope(kind="json", request_id=rid)


def fallback_id(job: Job) -> str:
    """The best id for a message that could not be decoded (for the audit row and logs)."""
    header_id = job.headers.get("id")
    if isinstance(header_id, str) and 0 < len(header_id) <= 255:
        return header_id
    return job.message_id or hashlib.sha256(job.body).hexdigest()


def identify(job: Job, task_name: str) -> Envelope:
    """Recognise the envelope and the request id; raise :class:`InvalidRequest` (naming the
    best id there is) when the delivery is not a request."""
    try:
        ensure_room(PARSE_SPACE_FACTOR * len(job.body))
        return _decode(job, task_name).envelope
    except InvalidRequest as exc:
        reason, message = exc.reason, exc.message
    except MemoryError:
        reason, message = "memory_limit", MEMORY_LIMIT_MESSAGE
    raise InvalidRequest(reason, message, fallback_id(job))


def _decode(job: Job, task_name: str) -> Decoded:
    try:
        return decode(
            job.body,
            job.headers,
            message_id=job.message_id,
            content_type=job.content_type,
            task_name=task_name,
        )
    except InvalidRequest as exc:
        # orjson reports a failed allocation as a JSON error ("Not enough memory to allocate
        # buffer for parsing"): it is the memory limit, not the body.
        if exc.reason == "not_json" and "memory" in exc.message.lower():
            raise MemoryError(exc.message) from None
        raise


@dataclass(frozen=True)
class Computed:
    computation: Computation
    seconds: float
    pid: int


def process(job: Job, task_name: str, config: PipelineConfig) -> Computed:
    """Decode, validate and compute one request. Raises InvalidRequest for bad data."""
    started = time.perf_counter()
    try:
        plain = job.envelope is not None and job.envelope.kind == "json"
        factor = JSON_REQUEST_SPACE_FACTOR if plain else REQUEST_SPACE_FACTOR
        ensure_room(factor * len(job.body))
        computation = _process(job, task_name, config)
    except MemoryError:
        # Hit DEPLOYFLAG_WORKER_MEMORY_LIMIT, in any stage: this payload is too big for a worker.
        raise InvalidRequest("memory_limit", MEMORY_LIMIT_MESSAGE) from None
    return Computed(computation, time.perf_counter() - started, os.getpid())


def _request(job: Job, task_name: str) -> tuple[Envelope, TrainingRequest]:
    """The validated request, parsing the body once."""
    if job.envelope is not None and job.envelope.kind == "json":
        # The body is the request: pydantic reads the bytes itself, without orjson's document
        # tree and dicts (less memory at the peak, one parse instead of two).
        try:
            return job.envelope, parse_request(job.body)
        except InvalidRequest:
            if not job.presumed:
                raise
            ensure_room(PARSE_SPACE_FACTOR * len(job.body))
            real = _decode(job, task_name).envelope  # raises its own reason for a non-request
            if (real.kind, real.request_id) != (job.envelope.kind, job.envelope.request_id):
                raise EnvelopeMismatch(real) from None
            raise
    decoded = _decode(job, task_name)
    return decoded.envelope, validate_request(decoded.request)


def _process(job: Job, task_name: str, config: PipelineConfig) -> Computation:
    from deployflag.pipeline import compute

    started = time.perf_counter()
    envelope, request = _request(job, task_name)
    with structlog.contextvars.bound_contextvars(
        request_id=envelope.request_id, repo_id=envelope.repo_id
    ):
        log = logs.get_logger("deployflag.worker")
        # The result (and its reply, built in the main process) grows with the shortcodes.
        check_shortcodes(request, _max_shortcodes)
        try:
            computation = compute(request, config)
        except MemoryError:
            raise
        except (ValueError, ArithmeticError) as exc:
            # Data the pipeline cannot handle is the message's fault: park, do not retry.
            raise InvalidRequest("pipeline_rejected", f"{type(exc).__name__}: {exc}") from None
        except Exception as exc:
            # Anything else is a bug; retrying the same data cannot help. Only builtin exception
            # types cross back to the loop, so the loop never needs numpy to unpickle them.
            raise InvalidRequest("pipeline_error", f"{type(exc).__name__}: {exc}") from None
        log.debug(
            "computed",
            rows=len(request.analysis_run) + len(request.historical_run),
            seconds=round(time.perf_counter() - started, 4),
            trained=computation.model.trained,
        )
    return computation


def serve(conn: Connection, initargs: tuple[Any, ...]) -> None:
    """A worker process's life: initialise, then run each job read from the pool's pipe and
    write back ``(True, value)`` or ``(False, exception)``, until the pipe closes."""
    init_worker(*initargs)
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:  # the service closed its end: stop
            return
        outcome: tuple[bool, Any]
        try:
            fn, args = pickle.loads(data)  # the service's own job, never a message's bytes
            outcome = (True, fn(*args))
        except Exception as exc:
            outcome = (False, exc)
        try:
            payload = pickle.dumps(outcome, pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # an unpicklable value or exception: say so instead
            failure = RuntimeError(f"the job's outcome could not be sent: {exc!r}"[:1000])
            payload = pickle.dumps((False, failure), pickle.HIGHEST_PROTOCOL)
        conn.send_bytes(payload)
