"""Shared fixtures live in tests/support/*; this file only registers them."""

pytest_plugins = [
    "tests.support.postgres",
    "tests.support.broker",
    "tests.support.payloads",
    "tests.support.tls",
]
