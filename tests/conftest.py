"""Session-wide test setup.

Several tests send SIGINT to a real CLI subprocess, as a terminal's Ctrl-C would, and check
that it stops with exit 130 and a checkpoint. A process started as a background job of a
non-interactive shell (``make test &``, ``nohup ./.ci/run &``) has SIGINT *ignored*, and its
children inherit that disposition: their Ctrl-C would then do nothing and those tests fail
for a reason that is not in the code under test. So the test process gives SIGINT its
usual Python handler back, which its subprocesses then start with (as the default action).
"""

from __future__ import annotations

import signal


def pytest_configure(config) -> None:
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
