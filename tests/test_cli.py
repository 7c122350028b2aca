"""The `mome` command as a user meets it: bad input is one line and exit code 2, never a traceback."""

from __future__ import annotations

import json

import pytest

from mome.cli.main import main as mome


@pytest.mark.parametrize("argv", [["synth", "--out", "X", "--preset", "bogus"], ["synth", "--out", "X", "--sites", "0"],
                                  ["synth", "--out", "X", "--size", "4"], ["certs", "--out", "X", "--sites", "0"],
                                  ["compose", "--out", "X", "--sites", "ucl,Bad_Id"],
                                  ["compose", "--out", "X", "--sites", "ucl,ucl"],
                                  ["compose", "--out", "X", "--sites", "superlink,ucl"],
                                  ["compose", "--out", "X", "--sites", "cli,ucl"], ["status", "X"]])
def test_bad_input_is_one_line_and_exit_code_2(argv, tmp_path, capsys):
    argv = [str(tmp_path / a) if a == "X" else a for a in argv]
    assert mome(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_sites_take_the_hospitals_own_ids_in_the_compose_file_and_the_certificates(tmp_path, capsys):
    compose = tmp_path / "docker-compose.yml"
    assert mome(["compose", "--sites", "charite,ucl", "--out", str(compose)]) == 0
    text = compose.read_text()
    assert all(f"  {s}:" in text and f"worker-{s}:" in text and f"enrol-{s}:" in text for s in ("charite", "ucl"))
    assert "site-a" not in text
    assert mome(["certs", "--sites", "charite,ucl", "--out", str(tmp_path / "certs")]) == 0
    out = capsys.readouterr().out
    assert "charite: waiting for the hospital's public keys" in out and "certs/sites/ucl/auth.key.pub" in out


def test_version_and_defaults_in_help(capsys):
    with pytest.raises(SystemExit) as done:
        mome(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("mome ")
    with pytest.raises(SystemExit):
        mome(["synth", "--help"])
    assert "(default: mixed)" in capsys.readouterr().out


def _entry(step: int) -> str:
    return json.dumps({"time": "2026-12-06T10:00:00+0000", "run_id": 7, "site": "site-a", "step": str(step),
                       "action": "train.shared", "arrays": [], "metrics": {"n_train": 4}, "configs": {}, "bytes": 10})


def test_a_torn_last_audit_line_is_left_out_and_an_altered_one_is_an_error(tmp_path, capsys):
    log = tmp_path / "audit.jsonl"
    log.write_text(_entry(1) + "\n" + _entry(2) + "\n" + _entry(3)[:40])  # a crash cut the last write short
    assert mome(["audit", str(log)]) == 0
    assert "2 replies in 1 run(s)" in capsys.readouterr().out
    log.write_text(_entry(1) + "\n{not json\n" + _entry(3) + "\n")
    assert mome(["audit", str(log)]) == 2
    assert "line 2" in capsys.readouterr().err


def test_mome_health_says_why_nothing_is_serving(tmp_path, capsys):
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    assert mome(["health", "--address", f"unix://{tmp_path}/worker.sock"]) == 1
    assert f"no socket at {tmp_path}/worker.sock" in capsys.readouterr().out
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert mome(["health", "--address", f"127.0.0.1:{port}"]) == 1
        assert capsys.readouterr().out.strip().endswith(": NOT_SERVING")
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert mome(["health", "--address", f"127.0.0.1:{port}"]) == 0
    finally:
        server.stop(None)
    assert mome(["health", "--address", f"127.0.0.1:{port}", "--timeout", "1"]) == 1
    assert "nothing answers there" in capsys.readouterr().out
