"""Stage processes forked from a warm parent, so that a stage's start-up is not torch's and MLflow's imports again.

Every stage is a fresh ``python -m tasks.<stage>`` that DVC starts, and on its own such a process spends about
9 s importing torch, MLflow (and its sqlalchemy store), pandas and matplotlib before any work: about as long as a
small stage's work. A flow run (``flows.stages.stage_server``) therefore starts one *stage server* for its stages:
a process that imports those libraries once, then waits on a Unix socket whose path it leaves in
``$SSLPIPE_STAGE_SERVER``. DVC passes that variable to each stage command, and the stage process, still
light, hands its whole invocation to the server (module, arguments, working directory, environment, CPU
affinity, umask, and its stdin/stdout/stderr themselves): the server forks a child that runs the stage
exactly as ``python -m`` would, on those file descriptors, and the stage process exits with the child's status.

What DVC sees is unchanged: the same command, the same output on the same pipes, the same exit status. A stage
process killed outright takes its child with it (the server notices the closed connection and kills the child);
SIGINT and SIGTERM are passed on. The children import the project's own code (``ssl_lib``, ``tasks``) fresh
from their working directory: the server preloads third-party libraries only, and runs no torch op before it
forks (a forked OpenMP pool would hang). Without ``$SSLPIPE_STAGE_SERVER``, or when the server cannot be reached,
a stage runs in its own process as before. ``SSLPIPE_STAGE_SERVER=off`` keeps a flow from starting one.

This module imports only the standard library at the top: a stage process imports it before it knows whether
it will run the stage itself.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Mapping

SERVER_ENV = "SSLPIPE_STAGE_SERVER"
# Set in a forked child: the pid of the stage's own process (the one DVC started, waiting for the child), whose
# creation time is the stage's start and whose parents are DVC's.
STAGE_PID_ENV = "SSLPIPE_STAGE_PROCESS_PID"
DISABLED = "off"
# Third-party modules every stage imports (or may): what makes a cold stage process slow to start. Some are
# imported late, on first use: torch._dynamo by the first optimizer, torch.export by MLflow's model loading,
# matplotlib's font manager by the first text drawn.
PRELOAD = (
    "numpy", "pandas", "PIL.Image", "pydantic", "yaml", "psutil", "torch", "torch.nn", "torch.nn.functional",
    "torch._dynamo", "torch.export", "torchvision", "torchvision.transforms.v2", "matplotlib", "matplotlib.pyplot",
    "matplotlib.font_manager", "matplotlib.backends.backend_agg", "sqlalchemy", "mlflow", "mlflow.tracking",
    "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store", "mlflow.models",
    "mlflow.models.signature", "mlflow.utils.requirements_utils",
    # DVC's command line, for tasks.dvc_cli: a flow's `dvc repro` and `dvc exp save` run in children too.
    "dvc.cli", "dvc.cli.parser", "dvc.commands.repro", "dvc.commands.experiments", "dvc.repo", "dvc.repo.reproduce",
    "dvc.repo.experiments", "dvc.stage", "dvc.output", "dvc.dependency",
)
# Caches worth filling once: MLflow maps installed packages to their modules (~1-3 s) on every log_model.
WARM_UP = (("mlflow.utils.requirements_utils", "_init_modules_to_packages_map"),
           ("mlflow.utils.requirements_utils", "_init_packages_to_modules_map"))
# Modules whose children start stage processes: their children keep the server's address, so that those stages
# are handed to it too. (A stage module's child drops it: it runs its stage itself.)
LAUNCHERS = ("dvc",)
# The project's own packages: imported fresh in every child, from its working directory.
PROJECT_PACKAGES = ("tasks", "ssl_lib", "flows", "benchmarks", "tests")
_LENGTH = struct.Struct("!I")
_STATUS = struct.Struct("!i")
_FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def server_address(env: Mapping[str, str] | None = None) -> str | None:
    """The socket of the stage server this process (or one started with ``env``) may hand its stage to, or None."""
    address = (os.environ if env is None else env).get(SERVER_ENV, "")
    return address if address and address != DISABLED else None


def stage_process_id() -> int:
    """The pid of the stage's own process: this one, or in a forked child the one DVC started."""
    return int(os.environ.get(STAGE_PID_ENV) or os.getpid())


def forked() -> bool:
    """Whether this stage runs in a child of the stage server."""
    return STAGE_PID_ENV in os.environ


def process_start_time() -> float:
    """When the stage's own process was created (epoch seconds), in a forked child too: its start-up's start."""
    import psutil

    return psutil.Process(stage_process_id()).create_time()


# --------------------------------------------------------------------------- the stage process's side

def delegate(module: str, args: list[str]) -> int | None:
    """Run ``python -m module args`` in a child of the stage server; its exit status, or None without a server.

    None also when the server cannot be reached: the caller then runs the stage itself.
    """
    address = server_address()
    if address is None:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(address)
    except OSError as err:
        conn.close()
        print(f"sslpipe: stage server at {address} unreachable ({err}); running the stage in this process",
              file=sys.stderr)
        return None
    request = {
        "module": module, "args": args, "cwd": os.getcwd(), "umask": _current_umask(),
        "env": {**os.environ, STAGE_PID_ENV: str(os.getpid())},
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    payload = json.dumps(request).encode()
    sys.stdout.flush()
    sys.stderr.flush()

    def forward(signum: int, frame: object) -> None:
        try:
            conn.send(bytes([signum]))
        except OSError:
            pass  # the server is gone: the status read below reports it

    previous = {signum: signal.signal(signum, forward) for signum in _FORWARDED_SIGNALS}
    try:
        with conn:
            try:
                socket.send_fds(conn, [_LENGTH.pack(len(payload))], _standard_fds())
                conn.sendall(payload)
            except OSError as err:  # nothing was started: run the stage here
                print(f"sslpipe: could not hand the stage to the server ({err}); running it in this process",
                      file=sys.stderr)
                return None
            status = _recv_exact(conn, _STATUS.size)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if status is None:
        print("sslpipe: the stage server went away before the stage finished", file=sys.stderr)
        return 1
    (code,) = _STATUS.unpack(status)
    return code if code >= 0 else 128 - code  # killed by signal N: the shell's 128 + N


def _standard_fds() -> list[int]:
    """This process's stdin, stdout and stderr, with /dev/null for any that is closed (a daemon's stdin)."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            fd = os.open(os.devnull, os.O_RDWR)
        fds.append(fd)
    return fds


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _recv_exact(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        try:
            chunk = conn.recv(size - len(data))
        except InterruptedError:
            continue
        if not chunk:
            return None
        data += chunk
    return data


# --------------------------------------------------------------------------- the server

def serve(address: str, parent_pid: int) -> None:
    """Bind ``address``, preload, then fork a child per request until ``parent_pid`` (the flow) is gone."""
    import selectors

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)  # before preloading: a stage that starts early waits in the backlog, not in vain
    listener.listen(16)
    # Ctrl-C reaches the whole process group: the flow stops this server itself. SIGTERM stops it cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop)
    _preload()
    sys.stdout.flush()
    sys.stderr.flush()
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    children: dict[socket.socket, int] = {}
    try:
        while os.getppid() == parent_pid:
            for key, _ in selector.select(timeout=0.2):
                if key.fileobj is listener:
                    conn, _ = listener.accept()
                    pid = _start_child(conn, listener, list(children))
                    if pid is None:
                        conn.close()
                    else:
                        children[conn] = pid
                        selector.register(conn, selectors.EVENT_READ)
                    continue
                conn = key.fileobj  # type: ignore[assignment]
                data = conn.recv(64)
                # Signals to pass on; or the stage process closed the connection: it was killed, and so is its child.
                for signum in data or [signal.SIGKILL]:
                    _kill(children[conn], signum)
                if not data:
                    selector.unregister(conn)
            for conn, pid in list(children.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                if not done:
                    continue
                try:
                    conn.sendall(_STATUS.pack(os.waitstatus_to_exitcode(status)))
                except OSError:
                    pass  # the stage process is gone already
                if conn in selector.get_map():  # still watched: its stage process is alive
                    selector.unregister(conn)
                conn.close()
                del children[conn]
    finally:  # the flow is gone, or stopped this server: no stage outlives it
        for pid in children.values():
            _kill(pid, signal.SIGKILL)
        listener.close()
        os.unlink(address)


def _preload() -> None:
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # an optional library: its importer will say so
    for module, function in WARM_UP:
        try:
            getattr(importlib.import_module(module), function)()
        except Exception:  # a private cache of a library: if it moved, the stages fill it themselves
            pass


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _start_child(conn: socket.socket, listener: socket.socket, others: list[socket.socket]) -> int | None:
    """Read one request from ``conn`` and fork the child that runs it; its pid (None for a broken request)."""
    conn.settimeout(30)
    try:
        head, fds, _, _ = socket.recv_fds(conn, _LENGTH.size, 3)
        if len(head) != _LENGTH.size or len(fds) != 3:
            raise OSError("incomplete request")
        payload = _recv_exact(conn, _LENGTH.unpack(head)[0])
        if payload is None:
            raise OSError("incomplete request")
        request = json.loads(payload)
    except (OSError, ValueError):
        return None
    conn.settimeout(None)
    pid = os.fork()
    if pid == 0:
        listener.close()  # (the selector's own descriptor is left: nothing in the child uses it)
        for other in others:
            other.close()
        conn.close()
        _run_child(request, fds)  # never returns
    for fd in fds:
        os.close(fd)
    return pid


def _run_child(request: dict, fds: list[int]) -> None:
    """In the forked child: become the stage process the request describes, run it, exit with its status."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in any Python process
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        if request.get("affinity") and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, request["affinity"])
        os.environ.clear()
        os.environ.update(request["env"])
        if request["module"] in LAUNCHERS:
            # Its stage processes are not this child: each finds its own pid, and hands itself to the server.
            os.environ.pop(STAGE_PID_ENV, None)
        else:
            os.environ.pop(SERVER_ENV, None)  # the child runs the stage itself
        # As `python -m` in that directory: the project's code comes from there, imported afresh.
        for name in [n for n in sys.modules if n.split(".")[0] in PROJECT_PACKAGES]:
            del sys.modules[name]
        sys.path[0] = request["cwd"]
        sys.argv = [request["module"], *request["args"]]
        sys.stdout.reconfigure(line_buffering=os.isatty(1))  # as a fresh process decides for its stdout
        code = _run_module(request["module"])
    finally:
        _exit(code)


def _run_module(module: str) -> int:
    import runpy
    import traceback

    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return 128 + signal.SIGINT
    except BaseException:
        traceback.print_exc()  # a bug keeps its traceback, as in a process of its own
        return 1
    return 0


def _exit(code: int) -> None:
    """Leave as an interpreter does (non-daemon threads joined, atexit run, streams flushed), then _exit."""
    import atexit
    import threading

    try:
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def start(address: str, env: dict[str, str], cwd: str) -> tuple[subprocess.Popen, bool]:
    """Start a server on ``address`` for this process (``subprocess.Popen``) and wait until it listens.

    Returns the process and whether it listens; a server that does not come up is stopped, and the stages run
    in processes of their own.
    """
    proc = subprocess.Popen([sys.executable, "-m", "tasks.stage_server", address, str(os.getpid())], cwd=cwd,
                            env=env, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(address):
            return proc, True
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    return proc, False


if __name__ == "__main__":  # python -m tasks.stage_server SOCKET PARENT_PID
    serve(sys.argv[1], int(sys.argv[2]))
