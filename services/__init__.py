"""Chiron's services (engine agent, router, queue, global scaler, gateway) and the ``chiron`` command.

Importing this package sets one gRPC default for every Chiron process, before grpc is loaded (grpc reads it
when it is first imported; a later change has no effect):
``GRPC_EXPERIMENTS=-event_engine_client,-event_engine_listener`` (:data:`GRPC_EXPERIMENTS_DEFAULT`), gRPC's
posix I/O path instead of its EventEngine endpoints: each streamed message costs one thread hop less on each
side, and Chiron streams every token as its own message. Measurements: ``docs/decisions/0010-grpc-posix-io-path.md``.

A ``GRPC_EXPERIMENTS`` already in the environment wins; set it empty to run with grpc's own defaults. A grpc
release without these experiments logs ``Unknown experiment`` at start-up, and ``tests/test_grpc_defaults.py``
fails on that line.
"""

from __future__ import annotations

import os

GRPC_EXPERIMENTS_DEFAULT = "-event_engine_client,-event_engine_listener"

os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS_DEFAULT)
