"""Property test of the whole OpenAPI surface: no generated request gets a 5xx.

Schemathesis derives requests from the gateway's own ``/openapi.json`` (valid and invalid
bodies, path parameters, headers) and sends them to the gateway process `stack up` runs, with
an admin API key so the authenticated and admin routes are exercised past the key check.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator

import psycopg
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.auth.key_store import create_api_key
from gateway.catalog.dsn import dsn
from gateway.settings import Settings
from rtinfer.stack import StackState

CATALOG_MODELS = ["fraud_xgb", "fraud_nn", "fraud_blend"]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def api_key(running_stack: StackState, stack_settings: Settings) -> Iterator[str]:
    assert running_stack.postgres is not None
    conninfo = dsn(stack_settings.state_dir / "postgres", running_stack.postgres.port).conninfo
    with psycopg.connect(conninfo, autocommit=True) as conn:
        _, token = create_api_key(conn, "openapi-fuzz", is_admin=True)
        yield token
        # shadows the fuzzer registered must not mirror other tests' traffic
        conn.execute("UPDATE model_deployments SET is_active = false WHERE is_shadow AND is_active")


def test_no_generated_request_gets_a_5xx(running_stack: StackState, api_key: str) -> None:
    assert running_stack.gateway_url is not None
    schema = schemathesis.openapi.from_url(f"{running_stack.gateway_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9, [op.label for op in operations]
    failures: list[str] = []
    statuses: Counter[int] = Counter()

    for operation in operations:

        @given(case=operation.as_strategy(), model=st.sampled_from([None, *CATALOG_MODELS]))
        @settings(
            max_examples=40,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: schemathesis.Case, model: str | None) -> None:
            if model is not None and "model_name" in (case.path_parameters or {}):
                case.path_parameters["model_name"] = model  # past the 404, into the handler
            response = case.call(headers={"X-API-Key": api_key}, timeout=30)
            statuses[response.status_code] += 1
            where = f"{case.method} {case.formatted_path} -> {response.status_code}"
            if response.status_code >= 500 and case.path != "/readyz":
                failures.append(f"{where}: {response.text[:300]}")
            elif response.status_code >= 400 and case.path != "/readyz":
                error = json.loads(response.text).get("error", {})
                if not {"code", "message"} <= set(error):
                    failures.append(f"{where}: not the error shape: {response.text[:300]}")

        check()
    assert not failures, "\n".join(failures[:20])
    # the generated inputs reached the handlers, not only the validation layer
    assert statuses[200] > 0 and statuses[422] > 0, statuses
