"""Deployment tooling: Nomad job files read and rendered as Nomad would (:mod:`services.deploy.jobspec`,
:mod:`services.deploy.gotemplate`), a local Nomad API stand-in that runs allocations as processes
(:mod:`services.deploy.nomad_local`), and ``chiron deploy rehearse`` (:mod:`services.deploy.rehearse`)."""
