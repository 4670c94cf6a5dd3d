from __future__ import annotations

import time

from proxy.requestid import new_request_id, request_id_from


def test_valid_client_ids_are_kept() -> None:
    for rid in ("abc", "A-1_2.3:4", "x" * 128):
        assert request_id_from(rid) == rid


def test_invalid_or_missing_ids_are_replaced() -> None:
    for rid in (None, "", "has space", "x" * 129, "semi;colon", "new\nline"):
        new = request_id_from(rid)
        assert new != rid and new.startswith("req_")


def test_new_ids_sort_by_time_and_are_unique() -> None:
    ids = []
    for _ in range(5):
        ids.append(new_request_id())
        time.sleep(0.002)
    assert ids == sorted(ids)
    assert len({new_request_id() for _ in range(10_000)}) == 10_000
