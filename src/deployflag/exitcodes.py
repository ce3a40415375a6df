"""Named exit codes (sysexits.h), so a supervisor can tell a crash from a bad configuration.

systemd's unit excludes RET_CONFIG from restarts (RestartPreventExitStatus=78).
"""

from __future__ import annotations

RET_OK = 0  # clean exit, including a drained shutdown on SIGTERM
RET_ERROR = 1  # a command failed in a way not listed below (e.g. healthcheck: not ready)
RET_USAGE = 2  # wrong command-line arguments (argparse)
RET_INVALID_INPUT = 65  # EX_DATAERR: the payload given to `run` is invalid
RET_NO_INPUT = 66  # EX_NOINPUT: the payload file cannot be read
RET_BROKER = 69  # EX_UNAVAILABLE: the broker cannot be reached, or was lost for good
RET_INTERNAL = 70  # EX_SOFTWARE: a bug; the traceback is logged
RET_DATABASE = 75  # EX_TEMPFAIL: the database cannot be reached at start
RET_CONFIG = 78  # EX_CONFIG: a setting is wrong, or the schema needs `migrate`
RET_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C outside `serve` (serve drains and exits RET_OK)
