"""Run a module as ``python -m`` does and report, at the very end, the threads still running
(test_distributed.py's checks of how a multi-process training ends):

    torchrun --nproc-per-node 2 tests/clean_exit.py [--fail-at K] -m dubtool train ...

As the interpreter exits (the last exit handler, after every other), writes to stderr
``rank R: exit CODE, N threads at exit: [names]``: the status the module exited with
(SystemExit's code, 0 when it returned, "uncaught" past an exception) and the threads of the
process as the kernel sees them, C++ ones included (Gloo's, NCCL's): any but the main one is
still running when the interpreter is torn down, which is how a process aborts after its
work is done ("terminate called without an active exception"). The process ignores SIGTERM:
once one process has failed, the launcher stops the others with it (SIGKILL 30 s later), and
each is to be seen ending on its own. ``--fail-at K``: every process raises a RuntimeError
in its K-th training forward pass (a bug or a bad batch in the middle of a run).
"""

from __future__ import annotations

import atexit
import os
import runpy
import signal
import sys
from pathlib import Path

STATUS = ["uncaught"]


def report() -> None:
    tasks = sorted(os.listdir("/proc/self/task"))
    names = [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in tasks]
    line = (f"rank {os.environ.get('RANK', '0')}: exit {STATUS[0]}, {len(names)} threads at "
            f"exit: {names}\n")
    sys.stderr.flush()
    os.write(2, line.encode())  # one write: the processes share the launcher's stderr


def fail_at(count: int) -> None:
    from dubtool.training import loop

    forward = loop.Objective.forward
    calls = [0]

    def failing(self, rng):
        calls[0] += 1
        if calls[0] == count:
            raise RuntimeError(f"injected failure in forward pass {count}")
        return forward(self, rng)

    loop.Objective.forward = failing


def main() -> None:
    atexit.register(report)  # registered first, so run last
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    args = sys.argv[1:]
    if args[0] == "--fail-at":
        fail_at(int(args[1]))
        args = args[2:]
    if args[0] != "-m":
        raise SystemExit("usage: clean_exit.py [--fail-at K] -m MODULE ARGS...")
    sys.argv = [args[1], *args[2:]]
    try:
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        STATUS[0] = "0"
    except SystemExit as exc:
        STATUS[0] = str(exc.code if isinstance(exc.code, int) else 1)
        raise


if __name__ == "__main__":
    main()
