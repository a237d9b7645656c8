"""``python tests/worker_entry.py worker ...``: the real CLI with test-only faults.

QWTEST_POISON=prefix   the process dies (os._exit) when it starts a job whose id has it
QWTEST_STEP_DELAY=s    every engine step sleeps this long first (a slower "GPU")
"""

import os
import sys
import time

from qworker.engine.engine import Engine

poison = os.environ.get("QWTEST_POISON")
delay = float(os.environ.get("QWTEST_STEP_DELAY", "0"))
real_add, real_step = Engine.add_request, Engine.step


def add_request(self, request_id, *args, **kw):
    if poison and request_id.startswith(poison):
        os._exit(77)
    return real_add(self, request_id, *args, **kw)


def step(self):
    if delay:
        time.sleep(delay)
    return real_step(self)


Engine.add_request, Engine.step = add_request, step

if __name__ == "__main__":
    from qworker.cli import main

    sys.exit(main())
