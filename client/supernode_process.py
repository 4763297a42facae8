"""The merchant agent's SuperNode as a child process that never outlives the agent.

Written by hand because ``subprocess`` only starts and waits: when ``storefed merchant`` was stopped
with SIGTERM (``kill``, systemd, a container runtime) Python exited at once and its
``flower-supernode`` child kept running, still connected to the coordinator and still training on
the merchant's data with nobody watching. Guarantees of :func:`run_supernode`:

- SIGTERM or SIGHUP to the agent is passed on to the SuperNode as SIGTERM (Flower's own clean
  shutdown); after ``grace_s`` seconds what is left is killed. The agent then exits 128 + signal.
- Ctrl-C in a terminal reaches both (same process group); the agent waits for the SuperNode as above
  and exits 130.
- On Linux the kernel sends the SuperNode SIGTERM when the agent dies in any other way (SIGKILL,
  a crash): ``prctl(PR_SET_PDEATHSIG)``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading

SUPERNODE_GRACE_S = 15.0  # Flower's SuperNode stops its ClientApp processes in well under this
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class _Stopped(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, frame: object) -> None:
    raise _Stopped(signum)


def _die_with(parent_pid: int):
    """A ``preexec_fn`` for the child: SIGTERM when ``parent_pid`` exits (Linux), also if it already has.
    libc is looked up here, before the fork, so the child only makes the call (no dlopen after fork)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent_pid:  # the parent died between fork and prctl
            os.kill(os.getpid(), signal.SIGTERM)
    return arm


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM, wait up to ``grace_s`` seconds, then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_supernode(command: list[str], env: dict[str, str], grace_s: float = SUPERNODE_GRACE_S) -> int:
    """Run ``command`` until it exits (its exit code) or the agent is told to stop (128 + the signal)."""
    linux = sys.platform.startswith("linux")
    proc = subprocess.Popen(command, env=env, preexec_fn=_die_with(os.getpid()) if linux else None)
    in_main = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread
    previous = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGTERM, signal.SIGHUP)} if in_main else {}
    try:
        return proc.wait()
    except _Stopped as stopped:
        _stop(proc, grace_s)
        return 128 + stopped.signum
    except KeyboardInterrupt:  # the terminal sent SIGINT to the SuperNode too; wait for it to finish
        _stop(proc, grace_s)
        return 128 + signal.SIGINT
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if proc.poll() is None:  # anything else went wrong here: the SuperNode does not stay behind
            proc.kill()
            proc.wait()
