"""Fuzzing every endpoint from the server's own OpenAPI schema (schemathesis) on a real port.

Each operation gets generated requests, valid and invalid; every response must be a non-5xx
whose status code, content type and body the schema declares. `benchmarks/fuzz.py` runs the
same with many more examples.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from neuroada_server.app import create_app
from neuroada_server.settings import ServerSettings
from tests.neuroada_server.conftest import RunningServer, make_settings

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("fuzz-store")
    # Small generation caps keep each generated request cheap; the limits themselves get fuzzed.
    with RunningServer(make_settings(tiny_model_dir, store, max_new_tokens=8, max_prompt_tokens=64)) as server:
        yield server
        assert server.engine.base_weights_intact()


# The schema comes from the app itself (building it loads no model); requests go to the real server.
schema = schemathesis.openapi.from_dict(create_app(ServerSettings()).openapi())


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_response_is_declared_and_no_request_gets_a_5xx(case, fuzz_server):
    case.call_and_validate(base_url=fuzz_server.url, checks=CHECKS)
