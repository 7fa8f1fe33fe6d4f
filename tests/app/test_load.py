"""A short run of the load test (bench/load_test.py) against the test server:
concurrent users, each with different programs, get exactly their serial results.

The full benchmark (8 users, 2 minutes, memory growth, latency) is
`make loadtest`; this keeps its code working and catches cross-talk in CI.
"""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.real_model


def test_concurrent_users_get_their_serial_results(app_url):
    from bench import load_test

    # Four of the cases with short answers, so the serial pass stays quick.
    cases = [load_test.CASES[i] for i in (1, 4, 5, 7)]
    expected = load_test.serial_results(app_url, cases)
    assert len({c.program for c in expected}) == len(cases)
    phase = load_test.run_users(app_url, expected, users=3, seconds=10)
    assert phase.errors == []
    assert phase.mismatches == []
    assert phase.requests >= 3  # every user finished at least one request
