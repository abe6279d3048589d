"""Settings that refuse to start (an open admin API on the network, contradictory dtypes or runners),
and the ones derived from others."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest
from pydantic import ValidationError

from neuroada_server.cli import add_serve_command
from neuroada_server.settings import ServerSettings
from tests.neuroada_server.conftest import ROOT


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.7", "example.org"])
def test_a_network_address_without_an_admin_token_is_refused(host):
    with pytest.raises(ValidationError, match="--admin-token"):
        ServerSettings(host=host)
    assert ServerSettings(host=host, admin_token="s3cret").admin_token == "s3cret"
    assert ServerSettings(host=host, generate_admin_token=True).generate_admin_token
    assert ServerSettings(host=host, allow_open_admin=True).allow_open_admin  # the explicit opt-out


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_needs_no_token(host):
    assert ServerSettings(host=host).admin_token is None


def test_serve_refuses_to_start_open_and_names_the_flag():
    done = subprocess.run(
        [sys.executable, "-m", "neuroada.cli", "serve", "--host", "0.0.0.0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "--admin-token" in done.stderr and "Traceback" not in done.stderr


def test_the_docker_image_never_starts_with_an_open_admin_api(monkeypatch):
    """The Dockerfile's environment, as the container sees it, must not give an open admin API."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    env_block = re.search(r"^ENV (.*?)(?=^\S)", dockerfile, re.S | re.M).group(1)
    env = dict(re.findall(r"(NEUROADA_\w+)=(\S+)", env_block))
    assert env["NEUROADA_HOST"] == "0.0.0.0"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("NEUROADA_ADMIN_TOKEN", raising=False)
    from neuroada_server.app import with_admin_token

    settings = with_admin_token(ServerSettings())
    assert settings.admin_token and len(settings.admin_token) >= 32


@pytest.mark.parametrize("conflict", [{"dtype": "bfloat16"}, {"dtype": "float16"}, {"runner": "hf"}])
def test_bf16_weights_need_float32_activations_and_our_decoder(conflict):
    with pytest.raises(ValidationError, match="weight_dtype bfloat16"):
        ServerSettings(weight_dtype="bfloat16", **conflict)
    assert ServerSettings(weight_dtype="bfloat16", dtype="float32").weight_dtype == "bfloat16"


def test_decode_buckets_stop_at_the_batch_size_which_is_always_one():
    assert ServerSettings(max_batch_size=12).decode_buckets == (1, 4, 12)
    assert ServerSettings(max_batch_size=12, compile_batch_sizes="1,2,4,8,16").decode_buckets == (1, 2, 4, 8, 12)
    assert ServerSettings(max_batch_size=3, compile_batch_sizes="4,1,1").decode_buckets == (1, 3)
    with pytest.raises(ValidationError, match="compile_batch_sizes"):
        ServerSettings(compile_batch_sizes="1,two")
    with pytest.raises(ValidationError, match="compile_decode compiles our decoder"):
        ServerSettings(compile_decode=True, runner="hf")


def test_the_decode_step_compiles_by_default_on_a_cuda_gpu_with_our_decoder_only():
    default = ServerSettings()
    assert default.compile_decode is None
    assert default.compiles_decode("cuda", our_decoder=True)
    assert not default.compiles_decode("cpu", our_decoder=True)
    assert not default.compiles_decode("cuda", our_decoder=False)  # Hugging Face's forward: nothing to compile
    assert not ServerSettings(runner="hf").compiles_decode("cuda", our_decoder=True)
    assert not ServerSettings(compile_decode=False).compiles_decode("cuda", our_decoder=True)
    assert ServerSettings(compile_decode=True).compiles_decode("cpu", our_decoder=True)


@pytest.mark.parametrize(
    "argv, expected", [([], None), (["--compile-decode"], True), (["--compile-decode", "false"], False)]
)
def test_compile_decode_on_the_command_line_alone_means_on(argv, expected):
    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    value = parser.parse_args(["serve", *argv]).compile_decode
    assert (value if value is None else ServerSettings(compile_decode=value).compile_decode) is expected


def test_compile_decode_from_the_environment(monkeypatch):
    monkeypatch.setenv("NEUROADA_COMPILE_DECODE", "false")
    assert ServerSettings().compile_decode is False
    monkeypatch.setenv("NEUROADA_COMPILE_DECODE", "1")
    assert ServerSettings().compile_decode is True
