"""The baselines' decision rules, one module per peer, each a pure function over one
:class:`~simulator.baselines.snapshot.FleetSnapshot` (plus its own config and state) so that it reads beside
its upstream source (``../shared/notes/baselines.md`` gives sources and commits) and is tested with a fake
clock. :mod:`simulator.policies` wraps each into a fleet policy (routing, ticks, variants)."""
