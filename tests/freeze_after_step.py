"""`python tests/freeze_after_step.py STEP ARGS...` runs `lorakit ARGS...` and freezes the process (SIGSTOP)
right after it has logged the training loss of step STEP to metrics.jsonl, so that a test can SIGKILL it from
outside at a known point between two checkpoints, as an OOM killer or a power cut would. Only this wrapper
knows about the freeze: lorakit itself carries no test hook. Under torchrun only rank 0 logs; the other ranks
then wait for it in the next all-reduce, so no process gets past the step."""

import os
import signal
import sys

from lorakit.report.progress import MetricsLog

freeze_at = int(sys.argv.pop(1))
log = MetricsLog.log


def log_then_freeze(self, step, **fields):
    record = log(self, step, **fields)
    if step == freeze_at and "loss" in fields:
        os.kill(os.getpid(), signal.SIGSTOP)
    return record


MetricsLog.log = log_then_freeze
from lorakit.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
