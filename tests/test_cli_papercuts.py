"""Issue 28's first-hour papercuts of ``chiron up`` / ``chiron demo`` (no cluster is started here):

1. vLLM engines run the model's own weights unless random ones are asked for (``--dummy-weights``) or the
   directory is a ``chiron tiny-model`` one (its marker file);
2. ``chiron up``'s gateway listens on 8000 (the README's ``curl``), and a taken port fails at once, in one line;
3. the report and plot go to folders that do not exist yet, and a plot that cannot be written never costs the
   report or ends in a traceback.
"""

from __future__ import annotations

import json
import socket

import click
import pytest
from click.testing import CliRunner

from chiron.v1 import queue_pb2
from services import cli
from services.cli._common import write_report_files
from services.cli.cluster import _run_replay
from services.cluster import ClusterConfig, PortInUseError, check_port_free, vllm_engine_args
from services.engine.vllm_backend import TINY_MODEL_MARKER, is_tiny_model, write_tiny_model
from services.replay import ReplayConfig, _Batch, _Interactive, build_report


def _real_model(d):
    """A model directory with (pretend) weights of its own, as one downloaded from the Hugging Face hub."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 1024,
                                               "max_position_embeddings": 2048, "torch_dtype": "bfloat16"}))
    (d / "model.safetensors").write_bytes(b"\0" * 16)
    return d


class _Captured(RuntimeError):
    pass


@pytest.fixture
def captured_cluster_config(monkeypatch):
    """Replace start_cluster: record the ClusterConfig that ``chiron up`` / ``chiron demo`` pass, start nothing."""
    seen: list[ClusterConfig] = []

    async def fake_start_cluster(cfg, on_progress=None):
        seen.append(cfg)
        raise _Captured("not started in this test")

    monkeypatch.setattr("services.cluster.start_cluster", fake_start_cluster)
    return seen


# 1. real weights unless asked ---------------------------------------------------------------------------------
def test_vllm_engine_args_use_a_real_models_own_weights_and_dtype(tmp_path):
    real = _real_model(tmp_path / "real")
    args = vllm_engine_args(real)
    assert "dummy" not in args and "--dtype" not in args
    assert args.startswith("--backend vllm --model ")
    assert "--load-format dummy" in vllm_engine_args(real, dummy_weights=True)
    assert "float32" not in vllm_engine_args(real, dummy_weights=True)  # the model's own dtype still


def test_vllm_engine_args_give_a_tiny_model_random_weights_by_its_marker(tmp_path):
    tiny = write_tiny_model(tmp_path / "tiny")
    assert (tiny / TINY_MODEL_MARKER).is_file() and is_tiny_model(tiny)
    args = vllm_engine_args(tiny)
    assert "--load-format dummy" in args and "--dtype float32" in args
    assert not is_tiny_model(_real_model(tmp_path / "real"))


@pytest.mark.parametrize("command", ["up", "demo"])
def test_up_and_demo_serve_a_real_model_without_dummy_weights(tmp_path, captured_cluster_config, command):
    real, tiny = _real_model(tmp_path / "real"), write_tiny_model(tmp_path / "tiny")
    runner = CliRunner()
    for model, extra, dummy in ((real, [], False), (real, ["--dummy-weights"], True), (tiny, [], True)):
        r = runner.invoke(cli.main, [command, "--backend", "vllm", "--model", str(model), *extra])
        assert r.exit_code == 1 and "not started in this test" in r.output, r.output
        engine_args = captured_cluster_config[-1].engine_args
        assert ("dummy" in engine_args) is dummy, (model, extra, engine_args)
        assert str(model) in engine_args


def test_up_refuses_a_weightless_directory_before_starting_anything(tmp_path, captured_cluster_config):
    d = tmp_path / "config-only"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 8,
                                               "max_position_embeddings": 8}))
    r = CliRunner().invoke(cli.main, ["up", "--backend", "vllm", "--model", str(d)])
    assert r.exit_code == 2 and "--dummy-weights" in r.output and not captured_cluster_config
    assert "--dummy-weights" in CliRunner().invoke(cli.main, ["up", "--help"]).output


# 2. the gateway on 8000 --------------------------------------------------------------------------------------
def test_up_puts_the_gateway_on_8000_by_default(captured_cluster_config):
    CliRunner().invoke(cli.main, ["up"])
    assert captured_cluster_config[-1].gateway_port == 8000
    CliRunner().invoke(cli.main, ["up", "--gateway-port", "0"])
    assert captured_cluster_config[-1].gateway_port == 0
    assert ClusterConfig().gateway_port == 0  # tests, benchmarks and the demo: a free port, never a collision


@pytest.fixture
def held_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


def test_a_taken_gateway_port_is_one_clear_error(held_port):
    with pytest.raises(PortInUseError) as e:
        check_port_free(held_port)
    assert str(e.value) == f"port {held_port} is in use; pass --gateway-port N (0 picks a free one)"
    check_port_free(0)  # 0: the system picks a free one; never in use


def test_up_on_a_taken_port_fails_before_starting_anything(held_port, tmp_path):
    work = tmp_path / "work"
    r = CliRunner().invoke(cli.main, ["up", "--gateway-port", str(held_port), "--work-dir", str(work)])
    assert r.exit_code == 1, r.output
    assert f"port {held_port} is in use; pass --gateway-port N (0 picks a free one)" in r.output
    assert "Traceback" not in r.output and not work.exists()  # nothing was started (etcd writes under WORK)


# 3. report and plot paths ------------------------------------------------------------------------------------
def _report() -> dict:
    inter = [_Interactive("a", 10, 5, accepted=True, status="OK", ttft_ms=200, itls=[20], tokens=5, finish=1)]
    timeline = [{"t_s": 0.0, "interactive": 1, "mixed": 0, "batch": 0}, {"t_s": 5.0, "interactive": 1, "mixed": 0, "batch": 0}]
    batch = [_Batch("b", 7, accepted=True, status="OK", state=queue_pb2.QUEUED_REQUEST_STATE_DONE, ttft_s=10, tokens=7)]
    return build_report(ReplayConfig(), "t", inter, batch, timeline, [(0.0, 0), (5.0, 1)], wall_s=5.0)


def test_report_and_plot_go_into_folders_that_do_not_exist_yet(tmp_path):
    json_path, plot_path = tmp_path / "a" / "b" / "r.json", tmp_path / "c" / "d" / "p.png"
    assert write_report_files(_report(), json_path, plot_path) is None
    assert json.loads(json_path.read_text())["trace"] == "t" and plot_path.stat().st_size > 1000


@pytest.mark.parametrize("bad_plot", ["file/p.png", "p.unknown-format"])
def test_a_plot_that_cannot_be_written_costs_neither_the_report_nor_a_traceback(tmp_path, bad_plot):
    (tmp_path / "file").write_text("a file where a folder would be")
    json_path = tmp_path / "new" / "r.json"
    error = write_report_files(_report(), json_path, tmp_path / bad_plot)
    assert error and "plot was not written" in error and "\n" not in error
    assert json.loads(json_path.read_text())["trace"] == "t"


def test_replay_writes_the_report_and_reports_a_bad_plot_in_one_line(tmp_path, monkeypatch, capsys):
    """``_run_replay`` (``chiron demo`` / ``chiron replay`` after the run) with both paths in new folders, then
    with a plot path that cannot be written."""
    report = _report()

    async def fake_replay(*args, progress=None, **kwargs):
        return report

    monkeypatch.setattr("services.replay.replay", fake_replay)

    def run(json_path, plot_path):
        return _run_replay("r", None, None, None, None, ReplayConfig(), str(json_path), str(plot_path))

    _, plot_error = run(tmp_path / "out" / "demo.json", tmp_path / "out2" / "demo.png")
    assert plot_error is None and (tmp_path / "out2" / "demo.png").is_file()
    (tmp_path / "file").write_text("")
    _, plot_error = run(tmp_path / "x" / "demo.json", tmp_path / "file" / "demo.png")
    assert plot_error and (tmp_path / "x" / "demo.json").is_file()
    assert "Traceback" not in capsys.readouterr().out


def test_write_report_files_raises_a_click_error_when_the_json_cannot_be_written(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(click.ClickException, match="cannot write the report"):
        write_report_files(_report(), tmp_path / "file" / "r.json", tmp_path / "p.png")
