"""OS thread names: what ``top -H`` shows for nubis's threads."""

from __future__ import annotations

import threading

from nubis._thread import comm_name, name_os_thread


def _comm_of(native_id: int) -> str:
    with open(f"/proc/self/task/{native_id}/comm") as f:
        return f.read().rstrip("\n")


def test_a_thread_names_itself_from_its_threading_name() -> None:
    seen: list[str] = []

    def body() -> None:
        name_os_thread()
        seen.append(_comm_of(threading.get_native_id()))

    thread = threading.Thread(target=body, name="nubis-net0-worker")
    thread.start()
    thread.join()
    assert seen == ["net0-worker"]


def test_names_are_cut_to_the_kernel_limit() -> None:
    assert comm_name("nubis-a-very-long-thread-name") == b"a-very-long-thr"
    assert comm_name("vcpu12") == b"vcpu12"
    seen: list[str] = []

    def body() -> None:
        name_os_thread("block-device-io-thread-7")
        seen.append(_comm_of(threading.get_native_id()))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == ["block-device-io"]
