"""The LOCAL HTTP STAND-IN for Nomad's API used by the Nomad provider's tests — not Nomad. It now lives in
:mod:`services.deploy.nomad_local` (which also runs allocations as processes for ``chiron deploy rehearse``); this
module re-exports it for the tests."""

from services.deploy.nomad_local import (  # noqa: F401 - re-exported
    Allocation,
    GroupState,
    JobState,
    NomadApiStandIn,
    RecordedRequest,
    load_job_spec,
    resolve,
    variable_defaults,
)
