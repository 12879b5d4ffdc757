"""Property-based fuzzing of every HTTP endpoint against the served ``/openapi.json``.

Schemathesis generates requests from the document, valid and invalid, sends them
to a real server and checks each answer: never a 5xx, a documented status, the
documented content type and a body that matches its schema. Run twice: against
an open server and against one with an API key, with and without the key.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import CheckFunction
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.utils import ServerProcess
from wsrelay.config import Settings
from wsrelay.server.openapi import document

EXAMPLES = 30
"""Examples per operation and mode: enough to walk each schema, small enough to be fast."""

KEY = "fuzz-key-1"

# positive_data_acceptance is left out: it expects every schema-valid request to get
# a 2xx, but a valid DELETE /register/<id> or GET /ws/<id> names a random id that
# was never registered (404), and a valid GET /ws token is not signed (401/404).
# Every other default check runs, negative_data_rejection included.
EXCLUDED: list[CheckFunction] = [positive_data_acceptance]


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[ServerProcess]:
    process = ServerProcess(["--api-key", KEY]).start()
    yield process
    process.stop()
    assert "Traceback" not in process.log(), process.log()


# The documents are built here by the function the servers serve them with (schemathesis'
# lazy from_fixture loader does not work with pytest 9); the first test checks that the
# served documents are exactly these.
OPEN_DOC = document(Settings())
KEYED_DOC = document(Settings(api_key=(KEY,)))
open_api = schemathesis.openapi.from_dict(OPEN_DOC)
keyed_api = schemathesis.openapi.from_dict(KEYED_DOC)

fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same examples every run: a failure reproduces
    database=None,  # so nothing is written into the work tree
)


async def test_the_fuzzed_documents_are_the_served_ones(
    server: ServerProcess, keyed_server: ServerProcess, session: aiohttp.ClientSession
) -> None:
    for process, doc in ((server, OPEN_DOC), (keyed_server, KEYED_DOC)):
        async with session.get(process.url + "/openapi.json") as response:
            assert response.status == 200
            assert await response.json() == json.loads(json.dumps(doc))


@open_api.parametrize()
@fuzz
def test_open_server_conforms_to_its_openapi_document(
    case: schemathesis.Case[Any], server: ServerProcess
) -> None:
    case.call_and_validate(base_url=server.url, excluded_checks=EXCLUDED)


@keyed_api.parametrize()
@fuzz
def test_keyed_server_conforms_with_the_key(
    case: schemathesis.Case[Any], keyed_server: ServerProcess
) -> None:
    case.call_and_validate(
        base_url=keyed_server.url,
        headers={"Authorization": f"Bearer {KEY}"},
        excluded_checks=EXCLUDED,
    )


@keyed_api.parametrize()
@fuzz
def test_keyed_server_conforms_without_the_key(
    case: schemathesis.Case[Any], keyed_server: ServerProcess
) -> None:
    case.call_and_validate(base_url=keyed_server.url, excluded_checks=EXCLUDED)
