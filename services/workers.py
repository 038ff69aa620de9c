"""Several worker processes behind one HTTP port: a small supervisor.

One Python process serves on one core (the GIL), so `clickloop serve
recommender` with `CLICKLOOP_RECOMMENDER_WORKERS=N` (or `serve collector` with
`CLICKLOOP_COLLECTOR_WORKERS=N`) runs N copies of the service, each its own
process with its own event loop and Kafka clients (the recommender's also its
model copy, breakers and hot-key cache), all listening on the same port with
SO_REUSEPORT: the kernel spreads new connections over them by
a hash of the connection's addresses (one shared accepting socket would not:
asyncio accepts a whole backlog per wake-up, so the first worker awake took
every connection of a burst).

The supervisor (`supervise`) serves nothing itself. It starts the workers,
restarts one that exits while the service is up (after a back-off that
doubles while workers keep dying young, `next_restart`; five quick deaths in
a row mean the service cannot start, so it stops everything and exits 1
instead of looping), and on SIGTERM or SIGINT passes SIGTERM on and waits
for every worker to finish its shutdown (exposures flushed) before it exits.

Metrics: the workers' Prometheus values live in memory-mapped files in one
directory (prometheus_client's multiprocess mode, `PROMETHEUS_MULTIPROC_DIR`,
a fresh directory per start, named after the supervisor's pid and pid namespace
so that the next start in that namespace removes those a killed supervisor left;
services/prom.py), so `/metrics` from any worker sums the counters and
histograms of all of them, dead ones included (a restart never makes a counter
go back), and shows each live worker's gauges with a `pid` label. `/health`
is the answering worker's own view (the recommender's breakers and model, the
collector's producer), with `worker_info()`.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from services.prom import MULTIPROCESS_DIR_ENV

WORKER_INDEX_ENV = "CLICKLOOP_WORKER_INDEX"   # set in a worker: bind with SO_REUSEPORT, never fork
WORKERS_ENV = "CLICKLOOP_WORKERS_OF"          # how many workers the supervisor runs
QUICK_EXIT_S = 10.0     # a worker that exits sooner than this after its start died young
MAX_QUICK_EXITS = 5     # in a row: give up
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 10.0
STOP_TIMEOUT_S = 30.0
PR_SET_PDEATHSIG = 1    # <linux/prctl.h>
_METRICS_DIR = re.compile(r"clickloop-.+-metrics-(\d+)-(\d+)-\w+")   # supervise()'s: ns, pid


def worker_count(configured: int) -> int:
    """`configured` workers; 0 means one per CPU this process may run on."""
    if configured > 0:
        return configured
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def worker_index() -> int | None:
    """This process's index among the supervisor's workers; None outside a supervisor."""
    raw = os.environ.get(WORKER_INDEX_ENV)
    return int(raw) if raw not in (None, "") else None


def worker_info() -> dict:
    """What /health says of the process that answered: pid, index, how many workers."""
    return {"pid": os.getpid(), "index": worker_index() or 0,
            "of": int(os.environ.get(WORKERS_ENV) or 1)}


@dataclass(frozen=True, slots=True)
class Restart:
    delay_s: float | None   # None: give up
    quick_exits: int        # deaths in a row, each soon after its start


def next_restart(quick_exits: int, lived_s: float) -> Restart:
    """What to do when a worker exits after `lived_s` seconds, `quick_exits` young deaths
    before it (pure): restart at once after a long life, else after a doubling delay, and
    give up after MAX_QUICK_EXITS young deaths in a row."""
    if lived_s >= QUICK_EXIT_S:
        return Restart(0.0, 0)
    quick = quick_exits + 1
    if quick >= MAX_QUICK_EXITS:
        return Restart(None, quick)
    return Restart(min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** (quick - 1)), quick)


@dataclass(slots=True)
class _Worker:
    index: int
    proc: subprocess.Popen
    started: float
    quick_exits: int = 0


def _say(line: str) -> None:
    print(line, flush=True)


def supervise(name: str, command: list[str], n: int, env: dict[str, str],
              log=_say) -> int:
    """Run `command` as `n` workers until SIGTERM/SIGINT or until they cannot start."""
    own_dir = not env.get(MULTIPROCESS_DIR_ENV)
    if own_dir:
        for gone in remove_stale_metrics_dirs(tempfile.gettempdir()):
            log(f"[{name}] removed {gone}: its supervisor is gone")
    metrics_dir = tempfile.mkdtemp(prefix=f"clickloop-{name}-metrics-{_pid_namespace()}-"
                                          f"{os.getpid()}-") if own_dir \
        else env[MULTIPROCESS_DIR_ENV]
    if not own_dir:  # a directory the operator chose: last run's files would be summed in
        os.makedirs(metrics_dir, exist_ok=True)
        for f in os.listdir(metrics_dir):
            if f.endswith(".db"):
                os.remove(os.path.join(metrics_dir, f))
    base = {**env, MULTIPROCESS_DIR_ENV: metrics_dir, WORKERS_ENV: str(n)}

    def spawn(index: int, quick_exits: int = 0) -> _Worker:
        # A session of its own: Ctrl-C in a terminal reaches the supervisor alone, which
        # stops each worker once; the parent-death signal stops a worker whose supervisor
        # was killed outright, so no orphan keeps serving on the port.
        proc = subprocess.Popen(command, env={**base, WORKER_INDEX_ENV: str(index)},
                                start_new_session=True, preexec_fn=_die_with_parent)
        return _Worker(index, proc, time.monotonic(), quick_exits)

    stopping = False

    def stop(*_) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    workers = [spawn(i) for i in range(n)]
    log(f"[{name}] {n} workers: pids {' '.join(str(w.proc.pid) for w in workers)}")
    pending: dict[int, tuple[float, int]] = {}   # index -> (restart at, quick exits)
    code = 0
    try:
        while not stopping:
            now = time.monotonic()
            for i, w in enumerate(workers):
                if w is None or w.proc.poll() is None:
                    continue
                _forget(w.proc.pid, metrics_dir)
                decision = next_restart(w.quick_exits, now - w.started)
                if decision.delay_s is None:
                    log(f"[{name}] worker {w.index} exited with {w.proc.returncode} "
                        f"{decision.quick_exits} times in a row within {QUICK_EXIT_S:.0f} s of "
                        "its start: stopping")
                    stopping, code = True, 1
                    break
                log(f"[{name}] worker {w.index} (pid {w.proc.pid}) exited with "
                    f"{w.proc.returncode}; restarting in {decision.delay_s:.1f} s")
                workers[i] = None  # type: ignore[call-overload]
                pending[i] = (now + decision.delay_s, decision.quick_exits)
            for i, (at, quick) in list(pending.items()):
                if not stopping and now >= at:
                    del pending[i]
                    workers[i] = spawn(i, quick)
                    log(f"[{name}] worker {i} restarted: pid {workers[i].proc.pid}")
            time.sleep(0.2)
    finally:
        live = [w.proc for w in workers if w is not None and w.proc.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in live:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"[{name}] worker pid {proc.pid} still running after "
                    f"{STOP_TIMEOUT_S:.0f} s: killed")
                proc.kill()
                proc.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if own_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return code


def stale_metrics_dirs(names: Iterable[str], namespace: int,
                       alive: Callable[[int], bool]) -> list[str]:
    """The metrics directories among `names` made in pid namespace `namespace` whose
    supervisor (the pid in the name) is not alive: left by one that was killed before it
    could remove its own. Another namespace's (a container sharing the temp directory)
    are never judged: its pids mean other processes."""
    return [n for n in names if (m := _METRICS_DIR.fullmatch(n)) and int(m.group(1)) == namespace
            and not alive(int(m.group(2)))]


def _pid_namespace() -> int:
    """The inode of this process's pid namespace (0 where there is no /proc)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return True


def remove_stale_metrics_dirs(parent: str) -> list[str]:
    """Remove this user's metrics directories in `parent` whose supervisor is gone; the
    paths removed."""
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    removed = []
    for name in stale_metrics_dirs(names, _pid_namespace(), _pid_alive):
        path = os.path.join(parent, name)
        try:
            if os.lstat(path).st_uid != os.getuid():
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _libc_prctl():
    """prctl(2), looked up in the supervisor (nothing is imported or loaded in a forked
    child before exec); None where there is none (not Linux)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()


def _die_with_parent() -> None:
    """In the forked child before exec: SIGTERM when the supervisor dies (Linux; elsewhere
    the supervisor's own stop still applies)."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


def _forget(pid: int, metrics_dir: str) -> None:
    """A dead worker's live gauges leave /metrics (its counters stay in the sums)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, metrics_dir)


def serve_command(service: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", "serve", service]
