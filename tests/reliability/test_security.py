"""Security: checkpoints never run code, the local server is on loopback with model control
closed, and no credential from the environment reaches the output or the compiled YAML."""

from __future__ import annotations

import ipaddress
import os
import pickle
from pathlib import Path

import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from artifacts import N_CLASSES, N_FEATURES
from processes import error_lines, torchship, wait_gone
from tritonclient.utils import InferenceServerException

from torchship.components.models import build_model, load_checkpoint
from torchship.components.triton.server import TritonServer


class _WritesMarker:
    """Unpickling this calls Path.write_text(marker): code execution if it ever loads."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_checkpoint_pickling_an_object_fails_to_load_without_running_it(tmp_path):
    marker = tmp_path / "marker"
    model = build_model("mlp", N_FEATURES, N_CLASSES)
    path = tmp_path / "evil.pt"
    torch.save({"model_name": "mlp", "n_features": N_FEATURES, "n_classes": N_CLASSES,
                "state_dict": model.state_dict(), "extra": _WritesMarker(marker)}, path)
    with pytest.raises(pickle.UnpicklingError) as excinfo:
        load_checkpoint(path)
    assert "Weights only load failed" in str(excinfo.value)
    assert not marker.exists(), "loading the checkpoint ran code"


def _listening_addresses(port: int) -> set[str]:
    """The local addresses with a LISTEN socket on ``port``, from /proc/net/tcp and tcp6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) != port or fields[3] != "0A":  # 0A: LISTEN
                continue
            # Each 32-bit word is little-endian hex; IPv4-mapped IPv6 (::ffff:a.b.c.d) is IPv4.
            words = [bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, len(address), 8)]
            raw = b"".join(words)
            if len(raw) == 16 and raw[:12] == b"\0" * 10 + b"\xff\xff":
                raw = raw[12:]
            found.add(str(ipaddress.ip_address(raw)))
    return found


def test_local_server_binds_loopback_and_model_control_is_closed(local_repo):
    with TritonServer(local_repo) as server:
        assert _listening_addresses(server.http_port) == {"127.0.0.1"}
        assert _listening_addresses(server.grpc_port) == {"127.0.0.1"}

        http = httpclient.InferenceServerClient(server.http_url)
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            assert http.is_model_ready("fp32")
            for client in (http, grpc):
                for call in (lambda c=client: c.unload_model("fp32"),
                             lambda c=client: c.load_model("fp32"),
                             lambda c=client: c.get_model_repository_index()):
                    with pytest.raises(InferenceServerException) as refused:
                        call()
                    assert "is restricted, expecting header" in str(refused.value)
            assert http.is_model_ready("fp32"), "the model was unloaded through the API"
        finally:
            http.close()
            grpc.close()
    assert wait_gone(str(local_repo.resolve())) == []


SECRETS = {
    "GOOGLE_APPLICATION_CREDENTIALS": "/secret/reliability-sa-key-8f3a.json",
    "GOOGLE_OAUTH_ACCESS_TOKEN": "ya29.reliability-fake-token-5e1c9d",
    "CLOUDSDK_AUTH_ACCESS_TOKEN": "ya29.reliability-fake-token-5e1c9d",
    "AWS_SECRET_ACCESS_KEY": "reliability-aws-secret-77b2",
}


@pytest.mark.parametrize("target", ["local", "vertex"])
def test_no_credential_reaches_the_compiled_yaml_or_the_output(tmp_path, target):
    env = {**os.environ, **SECRETS}
    output = tmp_path / "pipeline.yaml"
    done = torchship("compile", "--output", str(output), "--target", target, env=env,
                     timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    written = [output.read_text(), done.stdout, done.stderr]
    written += [p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()]
    for name, value in SECRETS.items():
        for text in written:
            assert value not in text, f"{name} leaked"
            assert name not in text, f"{name} named"


def test_no_credential_in_the_error_output_of_a_failing_command(tmp_path, pipeline_yaml):
    env = {**os.environ, **SECRETS}
    done = torchship("run", str(pipeline_yaml), "--pipeline-root", str(tmp_path / "runs"),
                     "--data-source", str(tmp_path / "missing.csv"), env=env, timeout=120)
    assert done.returncode == 2 and len(error_lines(done.stderr)) == 1, done.stderr[-2000:]
    written = done.stdout + done.stderr
    written += "".join(p.read_text(errors="replace") for p in (tmp_path / "runs").rglob("*")
                       if p.is_file())
    for value in SECRETS.values():
        assert value not in written
