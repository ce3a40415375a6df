"""deployflag: per-repository issue weights from fix-rate history, served over RabbitMQ."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("deployflag")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0+unknown"
