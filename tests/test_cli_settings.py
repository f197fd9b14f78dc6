"""The service commands' option defaults are their settings models' defaults (services/settings.py), so
a command only maps options onto settings; the settings build the same service configs the commands did."""

from __future__ import annotations

import pytest

from services.cli import main
from services.settings import EngineSettings, QueueSettings, RouterSettings, ScalerSettings

# option name (click's parameter name) -> settings field, where they differ
RENAMED = {"queue_addr": "queue_address", "lim_i": "interactive", "lim_m": "mixed", "lim_b": "batch"}


@pytest.mark.parametrize(("command", "settings", "required"), [
    ("engine", EngineSettings, []), ("queue", QueueSettings, []),
    ("router", RouterSettings, ["--etcd", "e:1", "--queue", "q:1"]), ("scaler", ScalerSettings, ["--etcd", "e:1"])])
def test_option_defaults_are_the_settings_defaults(command, settings, required):
    params = main.commands[command].make_context(command, list(required)).params
    given = {RENAMED.get(k, k): v for k, v in params.items() if RENAMED.get(k, k) in settings.model_fields}
    assert len(given) >= 2
    assert settings(**{k: v for k, v in given.items() if v is not None}) == settings(), command


def test_engine_defaults_that_depend_on_role_and_backend():
    assert EngineSettings().local_itl_slo_ms == 50.0
    assert EngineSettings(role="mixed").local_itl_slo_ms == 50.0
    assert EngineSettings(role="batch").local_itl_slo_ms == 500.0
    assert EngineSettings(role="batch", itl_slo_ms=80).local_itl_slo_ms == 80.0
    assert EngineSettings().batch_size_bound == 1024
    assert EngineSettings(backend="vllm").batch_size_bound == 256
    assert EngineSettings(static_batch_size=2048).batch_size_bound == 2048
    a = EngineSettings(static_batch_size=8).autoscaler_config()
    assert (a.initial_batch_size, a.max_batch_size) == (8, 1024)
    assert EngineSettings(role="interactive", queue_address="q:1").agent_config(a).queue_address is None
    assert EngineSettings(role="batch", queue_address="q:1").agent_config(a).queue_address == "q:1"
    with pytest.raises(ValueError, match="llama-3-8b or llama-2-70b"):
        EngineSettings(model="gpt-2").check_model()


def test_scaler_settings_from_args_and_election():
    s = ScalerSettings.from_args("--interactive 1:4 --mixed=0:2 --advisory --interval-s 2 --etcd x:1")
    assert (s.interactive, s.mixed, s.batch, s.interval_s) == ((1, 4), (0, 2), (0, 16), 2.0)
    assert s.policy_config().interval_s == 2.0
    assert ScalerSettings().elects and not ScalerSettings(advisory=True).elects
    with pytest.raises(ValueError, match="advisory"):
        _ = ScalerSettings(advisory=True, election=True).elects
