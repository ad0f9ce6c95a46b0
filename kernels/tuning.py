"""Compiling a tuner's candidates in parallel before any is timed: in worker processes, else on
threads.

Triton's front end holds the GIL for much of a compile, so threads scale poorly with cores.
Worker processes instead compile each candidate into Triton's on-disk cache, from which the
timed launches here then load it. A candidate reaches a worker as the JIT's own specialisation:
its compile call (a ``kernel.warmup``) runs in this process under a ``jit_cache_hook`` that
records what the JIT was about to compile (Triton's serialised form, the one
``JITFunction.preload`` takes) and skips the compile; the worker preloads that record (the
JIT's compile path, with a stand-in driver that names this process's target and touches no
device) into the same cache directory, so it stores the entry under the key the JIT here looks
up. Workers are plain ``python -c`` subprocesses that never initialise CUDA: multiprocessing's
spawn and forkserver children would run the caller's ``__main__`` script again.

Whatever cannot go to a worker (no worker process could start, one died, a kernel that is not
importable by name, a different environment) is compiled on threads through Triton's
asynchronous compile instead. A candidate that fails to compile is left to its timed launch,
which compiles it again and counts it as failed. CUDA only: the interpreter compiles nothing.
"""
import atexit
import importlib
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from triton.errors import TritonError
from triton.runtime.driver import driver

try:
    from triton import knobs
except ImportError:  # a Triton before 3.4: no hook to record a compile with, threads only
    knobs = None


def compile_in_parallel(compile, candidates: list, device) -> None:
    """compile(cfg) (a kernel.warmup call) for every candidate at once: in worker processes where
    they run, the rest on threads. Errors are left to the timed launch. CUDA only."""
    if device.type != "cuda" or len(candidates) < 2:
        return
    compile_on_threads(compile, compile_in_processes(compile, candidates) if knobs is not None else candidates)


def compile_on_threads(compile, candidates: list, threads: int | None = None) -> None:
    """compile(cfg) for each candidate on a thread pool, through Triton's asynchronous compile
    (its compiler and ptxas release the GIL part of the time). A compile call that raises is left
    to the candidate's timed launch."""
    if not candidates:
        return
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:  # a Triton without it: candidates compile as they are timed
        return
    with ThreadPoolExecutor(min(len(candidates), threads or os.cpu_count() or 1)) as pool:
        try:
            with AsyncCompileMode(pool, ignore_errors=True):
                for cfg in candidates:
                    try:
                        compile(cfg)
                    except Exception:  # e.g. invalid for this shape: its timed launch says so
                        pass
        except RuntimeError:  # another asynchronous compile is active: compile as we time
            pass


@dataclass(frozen=True)
class CompileRequest:
    """One kernel compile as the JIT here would run it: the kernel by module and name, its source
    fingerprint (``cache_key``), the JIT's serialised specialisation and the target."""

    module: str
    name: str
    fn_key: str
    specialization: str
    target: object  # triton.backends.compiler.GPUTarget


def compile_in_processes(compile, candidates: list, workers: "Workers | None" = None) -> list:
    """Have worker processes (``workers``, by default this process's: compile_workers) compile
    what compile(cfg) would for each candidate; returns the candidates still to compile here (a
    request that could not be made, or that no worker compiled)."""
    try:
        target = current_target()
    except Exception:  # no driver to ask: nothing to ship
        return candidates
    requests = {}  # candidate index -> its CompileRequests (None: one that cannot be shipped)
    for i, cfg in enumerate(candidates):
        with capturing_compiles(target) as captured:
            try:
                compile(cfg)
            except Exception:  # left to its timed launch, as on threads
                pass
        requests[i] = captured
    unique = list(dict.fromkeys(r for rs in requests.values() for r in rs if r is not None))
    workers = workers or (compile_workers() if unique else None)
    status = dict(zip(unique, workers.compile_all(unique) if workers else ["lost"] * len(unique)))
    # "failed": a compile error of the candidate's own, left to its timed launch like any other.
    return [cfg for i, cfg in enumerate(candidates)
            if any(r is None or status[r] not in ("ok", "failed") for r in requests[i])]


def current_target():
    """The target the JIT here compiles for (its current device's)."""
    return driver.active.get_current_target()


_local = threading.local()
_hook_lock = threading.Lock()
_hook_users = 0
_previous_hook = None


class capturing_compiles:
    """Within it, a JIT compile in this thread is recorded as a CompileRequest for ``target``
    (None where it cannot be shipped) and skipped; other threads' compiles are untouched."""

    def __init__(self, target):
        self.target = target
        self.requests = []

    def __enter__(self):
        global _hook_users, _previous_hook
        with _hook_lock:
            if _hook_users == 0:
                _previous_hook, knobs.runtime.jit_cache_hook = knobs.runtime.jit_cache_hook, _record_compile
            _hook_users += 1
        _local.capture = self
        return self.requests

    def __exit__(self, *exc):
        global _hook_users
        _local.capture = None
        with _hook_lock:
            _hook_users -= 1
            if _hook_users == 0:
                knobs.runtime.jit_cache_hook = _previous_hook


def _record_compile(*, fn, compile, **kwargs):
    """Triton's jit_cache_hook: a true result skips the compile."""
    capture = getattr(_local, "capture", None)
    if capture is None:
        return _previous_hook(fn=fn, compile=compile, **kwargs) if _previous_hook is not None else None
    request = None  # what cannot be shipped compiles on threads
    try:
        kernel = fn.jit_function
        if kernel.__module__ != "__main__" and getattr(sys.modules.get(kernel.__module__), kernel.__name__, None) \
                is kernel:
            request = CompileRequest(kernel.__module__, kernel.__name__, kernel.cache_key,
                                     compile["specialization_data"], capture.target)
    except Exception:
        pass
    capture.requests.append(request)
    return True


def environment() -> tuple:
    """What a worker must share with this process for its compiles to land under this process's
    keys: Triton's cache-invalidating environment variables and its cache directory."""
    from triton._C.libtriton import get_cache_invalidating_env_vars

    return tuple(sorted(get_cache_invalidating_env_vars().items())), knobs.cache.dir


class Workers:
    """Worker processes, each serving compile requests one at a time over its stdin and stdout."""

    def __init__(self, count: int):
        self.count = count
        self.variables = environment()[0]  # inherited; the cache directory goes with each request
        self.broken = False
        self._idle = queue.SimpleQueue()
        self._procs = []
        path = os.pathsep.join(os.path.abspath(p or os.curdir) for p in sys.path)
        try:
            for _ in range(count):
                # Their own session: a Ctrl-C meant for this program does not reach them (they
                # leave when their stdin closes).
                proc = subprocess.Popen([sys.executable, "-c", "from kernels.tuning import serve; serve()"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        env=dict(os.environ, PYTHONPATH=path), start_new_session=True)
                self._procs.append(proc)
                self._idle.put(proc)
        except Exception:
            self.close()
            raise

    def compile_all(self, requests: list) -> list:
        """Each request's status (compile_request's, or "lost" where no worker answered)."""
        if not requests:
            return []
        with ThreadPoolExecutor(min(len(requests), self.count)) as pool:
            return list(pool.map(self.compile, requests))

    def compile(self, request: CompileRequest) -> str:
        proc = self._idle.get()
        try:
            if self.broken:
                return "lost"
            pickle.dump((request, environment()), proc.stdin)
            proc.stdin.flush()
            status, _ = pickle.load(proc.stdout)
            return status
        except Exception:  # a worker that died or spoke out of turn: none is used again
            self.broken = True
            return "lost"
        finally:
            self._idle.put(proc)

    def close(self):
        """End every worker: end of input, and a kill for one still busy a moment later."""
        for proc in self._procs:
            try:
                proc.stdin.close()
            except OSError:  # it died
                pass
        deadline = time.monotonic() + 2
        for proc in self._procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs = []


_workers = None
_workers_lock = threading.Lock()
_workers_failed = False


def compile_workers() -> Workers | None:
    """This process's compile workers (os.cpu_count() of them), started on first use and reused
    while Triton's cache-invalidating environment variables stay the same; None where they cannot
    run (they could not start, or broke once: threads compile from then on)."""
    global _workers, _workers_failed
    with _workers_lock:
        if _workers is not None and (_workers.broken or _workers.variables != environment()[0]):
            _workers_failed |= _workers.broken
            _workers.close()
            _workers = None
        if _workers is None and not _workers_failed:
            try:
                _workers = Workers(os.cpu_count() or 1)
            except Exception:
                _workers_failed = True
        return _workers


@atexit.register
def shutdown_workers():
    global _workers
    with _workers_lock:
        if _workers is not None:
            _workers.close()
            _workers = None


class TargetDriver:
    """A stand-in for Triton's active driver that names a compile target and touches no device:
    all a JIT compile asks of the driver."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def compile_request(request: CompileRequest, env) -> tuple:
    """Compile one request into the cache: ("ok", ""), ("failed", why) for a compile error of
    the candidate, ("skipped", why) where this process cannot reproduce the requester's key."""
    variables, cache_dir = env
    if environment()[0] != variables:
        return "skipped", "cache-invalidating environment variables differ"
    knobs.cache.dir = cache_dir
    try:
        kernel = getattr(importlib.import_module(request.module), request.name)
    except Exception as exc:
        return "skipped", f"{type(exc).__name__}: {exc}"
    if getattr(kernel, "cache_key", None) != request.fn_key:
        return "skipped", "the kernel's source differs from the requester's"
    driver.set_active(TargetDriver(request.target))  # a worker's only use of the driver
    try:
        kernel.preload(request.specialization)
    except TritonError as exc:
        return "failed", f"{type(exc).__name__}: {exc}"
    except Exception as exc:
        return "skipped", f"{type(exc).__name__}: {exc}"
    return "ok", ""


def serve():
    """A worker's loop: (request, environment) in on stdin, (status, detail) out on stdout, until
    stdin closes. Anything else the compile prints goes to stderr."""
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    requests = sys.stdin.buffer
    while True:
        try:
            request, env = pickle.load(requests)
        except EOFError:
            return
        pickle.dump(compile_request(request, env), replies)
        replies.flush()
