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


def test_a_forked_child_never_repeats_its_parents_next_ids() -> None:
    """The random part is read from the kernel in batches: a child forked mid-batch
    reads its own rather than the rest of its parent's."""
    import os

    new_request_id()  # a batch is started
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then out
        os.close(read_end)
        os.write(write_end, " ".join(new_request_id()[16:] for _ in range(4)).encode())
        os._exit(0)
    os.close(write_end)
    mine = {new_request_id()[16:] for _ in range(4)}
    child = set(os.read(read_end, 4096).decode().split())
    os.close(read_end)
    os.waitpid(pid, 0)
    assert len(child) == 4 and not mine & child
