import pytest

from polar_core.limits import LimitError, Limits


def test_env_overrides_and_bad_values():
    limits = Limits.from_env({"POLAR_MAX_NEW_TOKENS": "16", "POLAR_REQUEST_SECONDS": "2.5"})
    assert limits.max_new_tokens == 16 and limits.request_seconds == 2.5
    with pytest.raises(LimitError, match="POLAR_MAX_NEW_TOKENS"):
        Limits.from_env({"POLAR_MAX_NEW_TOKENS": "lots"})
    with pytest.raises(LimitError, match="positive"):
        Limits.from_env({"POLAR_MAX_UPLOAD_BYTES": "0"})


def test_checks_name_the_limit():
    limits = Limits(max_new_tokens=8, max_search_budget=10, max_upload_bytes=4)
    assert limits.check_new_tokens(8) == 8
    with pytest.raises(LimitError, match="limit is 8"):
        limits.check_new_tokens(9)
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(LimitError):
            limits.check_new_tokens(bad)
    with pytest.raises(LimitError, match="limit is 10"):
        limits.check_search_budget(11)
    with pytest.raises(LimitError, match="5 bytes"):
        limits.check_upload("abcde")
    assert limits.max_steps(30) == 120
