"""koala_middleware.testing: the Collector users test against, and the pytest fixtures."""

from __future__ import annotations

import httpx
import pytest

from koala_middleware import KoalaClient
from koala_middleware.testing import Collector

pytest_plugins = ["pytester"]


def test_queries_tell_visitor_and_account_batches_apart(collector: Collector, client: KoalaClient) -> None:
    with client.tracker(email="ada@acme.com") as tracker:
        tracker.track("Signed Up")
        tracker.account("acme.com").track("Plan Changed", {"plan": "pro"})
    assert client.flush(5)
    assert [b["email"] for b in collector.batches()] == ["ada@acme.com"]
    assert [e["event"] for e in collector.events()] == ["Signed Up"]
    assert [b["domain"] for b in collector.account_batches()] == ["acme.com"]
    assert [e["event"] for e in collector.account_events()] == ["Plan Changed"]
    assert sorted(r.route for r in collector.requests()) == ["accounts/batch", "batch"]


def test_faults_are_methods_and_reset_undoes_them(collector: Collector) -> None:
    url = f"{collector.url}/web/projects/pk_test/batch"
    collector.fail_next(1, status=429, headers={"Retry-After": "3"})
    failed = httpx.post(url, content=b"{}")
    assert (failed.status_code, failed.reason_phrase, failed.headers["retry-after"]) == (429, "Too Many Requests", "3")
    collector.answer_with(lambda received: 418 if received.route == "batch" else 200)
    assert httpx.post(url, content=b"{}").reason_phrase == "I'm a Teapot"
    collector.answer_with(599)
    assert httpx.post(url, content=b"{}").reason_phrase == "Status"  # no phrase for it
    collector.slow(5)
    collector.hang()
    collector.reset()
    assert httpx.post(url, content=b"{}", timeout=2).status_code == 200
    collector.down()
    with pytest.raises(httpx.ConnectError):
        httpx.post(url, content=b"{}")
    collector.up()
    assert httpx.post(url, content=b"{}").status_code == 200


def test_the_pytest_plugin_gives_users_a_collector_and_a_client(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_user(koala_client, koala_collector):
            with koala_client.tracker(email="ada@acme.com") as tracker:
                tracker.track("Signed Up")
            assert koala_client.flush(5)
            assert koala_collector.events()[0]["event"] == "Signed Up"
        """
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
