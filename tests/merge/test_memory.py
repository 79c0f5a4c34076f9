"""merge/memory.py: the heap policy and the paused cycle collector hold while a merge runs, are restored when the
last concurrent merge ends (also after an error), and the heap settings are ones glibc accepts."""

from __future__ import annotations

import gc

import pytest

from merge import memory


class FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


SET = [
    ("mallopt", memory.M_MMAP_THRESHOLD, memory.MMAP_THRESHOLD),
    ("mallopt", memory.M_TRIM_THRESHOLD, memory.TRIM_THRESHOLD),
]
RESTORE = [
    ("mallopt", memory.M_MMAP_THRESHOLD, memory.MMAP_AFTER),
    ("mallopt", memory.M_TRIM_THRESHOLD, memory.TRIM_THRESHOLD),
    ("malloc_trim", 0),
]


def test_policy_holds_inside_and_the_last_merge_out_restores_it(monkeypatch: pytest.MonkeyPatch) -> None:
    libc = FakeLibc()
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    assert gc.isenabled()
    with memory.merge_memory():
        assert libc.calls == SET and not gc.isenabled()
        with memory.merge_memory():  # a second merge at the same time (a search's workers)
            pass
        assert libc.calls == SET and not gc.isenabled()  # the first merge is still running
    assert libc.calls == SET + RESTORE and gc.isenabled()
    with pytest.raises(RuntimeError), memory.merge_memory():
        raise RuntimeError("a failed merge")
    assert libc.calls[-3:] == RESTORE and gc.isenabled()


def test_a_collector_the_caller_disabled_stays_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_glibc", lambda: None)  # and off glibc the heap is left alone
    gc.disable()
    try:
        with memory.merge_memory():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_glibc_accepts_the_settings() -> None:
    libc = memory._glibc()
    if libc is None:
        pytest.skip("not glibc")
    for param, value in [(p, v) for _, p, v in SET] + [(p, v) for _, p, v in RESTORE[:2]]:
        assert libc.mallopt(param, value) == 1  # 1: accepted
