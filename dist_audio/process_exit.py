"""Leaving a process once its work is written, without the interpreter's teardown.

Two costs of that teardown are not worth paying:
- in a distributed run, a gloo worker thread can still hold a finished collective when the main thread
  finishes; freeing its tensors needs the GIL, and taking the GIL while the interpreter finalizes aborts
  the process (SIGABRT, "terminate called without an active exception"; pytorch/pytorch#179291), so the
  launcher reports a finished run as failed (seen on CI, and in a core dump here);
- after a plan, freeing the traced models and fake-tensor caches takes about a second of a 3 s answer.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def exit_without_teardown(code: int) -> NoReturn:
    """Exit with ``code`` now. Callers close or fsync their own files first; only logging and the
    standard streams are flushed here."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
