"""Chiron's services (engine agent, router, queue, global scaler, gateway) and the ``chiron`` command.

Importing this package sets one gRPC default for every Chiron process, before grpc is loaded (grpc reads it
when it is first imported; a later change has no effect):

``GRPC_EXPERIMENTS=-event_engine_client,-event_engine_listener`` (:data:`GRPC_EXPERIMENTS_DEFAULT`) — gRPC's
posix I/O path instead of its EventEngine endpoints. Each streamed message then costs one thread hop less on
each side. Chiron streams every token as its own message (engine → router → gateway), so the per-message cost
is its main gRPC cost. A micro-benchmark on the 2-core VM (32 server streams paced like engine steps, 6,200
messages/s) measured these costs per message:

* client CPU: 42–50 → 21–30 µs; context switches: about 1.9 → 0.55;
* server CPU: 37–54 → 29–38 µs; context switches: about 1.8 → 0.8.

``chiron bench engine-overhead`` at concurrency 32 (same session, alternating) measured the agent overhead
at 8.5%, 10.0% and 11.7% with grpc's defaults, against 2.8%, 4.9% and 3.6% with this setting.

A ``GRPC_EXPERIMENTS`` already in the environment wins. Set it empty to run with grpc's own defaults. A
grpc release without these experiments logs ``Unknown experiment`` at start-up, and
``tests/test_grpc_defaults.py`` fails on that line.
"""

from __future__ import annotations

import os

GRPC_EXPERIMENTS_DEFAULT = "-event_engine_client,-event_engine_listener"

os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS_DEFAULT)
