"""Random sequences of lifecycle requests over the socket give exactly the answers the state machine predicts."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from nubis.api.remote import ApiClient
from nubis.api.server import ApiServer
from nubis.api.testing import FakeVmm
from nubis.vmm.lifecycle import InvalidStateError, VmAction, VmState, next_state

CONFIG = json.dumps({"payload": {"kernel": "/boot/vmlinux"}}).encode()

ENDPOINTS: dict[VmAction, str] = {
    VmAction.CREATE: "vm.create",
    VmAction.BOOT: "vm.boot",
    VmAction.PAUSE: "vm.pause",
    VmAction.RESUME: "vm.resume",
    VmAction.SHUTDOWN: "vm.shutdown",
    VmAction.REBOOT: "vm.reboot",
    VmAction.POWER_BUTTON: "vm.power-button",
    VmAction.DELETE: "vm.delete",
}


class ApiLifecycle(RuleBasedStateMachine):
    """The model is ``next_state``; the system is the server over its Unix socket."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="nubis-life-", dir="/tmp")
        self.server = ApiServer(os.path.join(self.directory, "api.sock"), FakeVmm())
        self.server.start()
        self.client = ApiClient(self.server.path)
        self.model: VmState | None = None

    def teardown(self) -> None:
        self.server.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    @rule(action=st.sampled_from(list(VmAction)))
    def request(self, action: VmAction) -> None:
        body = CONFIG if action is VmAction.CREATE else None
        answer = self.client.request("PUT", ENDPOINTS[action], body)
        try:
            expected = next_state(self.model, action)
        except InvalidStateError as error:
            assert answer.status == 409
            assert answer.body == {"error": str(error)}
        else:
            assert (answer.status, answer.body) == (204, None)
            self.model = expected

    @invariant()
    def info_reports_the_model_state(self) -> None:
        answer = self.client.request("GET", "vm.info")
        if self.model is None:
            assert answer.status == 409
        else:
            info: Any = answer.body
            assert (answer.status, info["state"]) == (200, self.model.value)


ApiLifecycle.TestCase.settings = settings(max_examples=20, stateful_step_count=15, deadline=None)
TestApiLifecycle = ApiLifecycle.TestCase
