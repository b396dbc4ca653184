"""Node processes for tests without paying the imports each time: a fork server.

A server process spends most of its start importing torch, transformers and libp2p: about 10 s of
CPU each on the 2-core CI machine, and the suite starts dozens of them. A fork server imports all of
that once per test worker and forks a child for every node it is asked for. Each child is still a
separate OS process with its own libp2p host, sockets and model weights (copied on write), started
in a session of its own, with the environment, working directory, arguments and stdout/stderr the
test asked for; it runs `python -m dsdnode ...` (or tests/helpers/faulty_server.py) as the
interpreter would, and exits like it.

`ForkedProcess` gives a test the parts of `subprocess.Popen` it uses (pid, stdout, poll, wait, kill,
terminate, send_signal, returncode). The fork server reaps its children and reports each exit status
over the connection that asked for the child.

A child is forked only while the server runs no more threads than its imports left (a thread pool
that existed at fork time would be missing in the child): the server checks before every fork. As
PyTorch's own forked data-loader workers do, a child starts its thread pools after the fork. `spawn` falls
back to a plain subprocess when the server is not there or refuses, or when the requested
environment differs in a variable that modules read while they are imported.

Run as `python -m tests.helpers.forkserver SOCKET_PATH PARENT_PID` (tests/conftest.py starts one
per test worker)."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

PRELOAD = ("dsdnode.cli", "dsdnode.server.node", "dsdnode.server.daemon", "dsdnode.models.span",
           "transformers.models.llama.modeling_llama", "transformers.models.qwen2.modeling_qwen2")
FORKABLE_SCRIPTS = ("faulty_server.py",)  # not no_torch.py: its point is a process without torch
IMPORT_TIME_ENV = ("HF_", "TRANSFORMERS", "TORCH", "PYTORCH", "PYTHON", "LD_", "MKL", "KMP", "LIBP2P")
MAX_REQUEST = 1 << 20
START_TIMEOUT_S = 300.0
UNKNOWN_EXIT = 255  # a child whose exit the fork server could not report (it died first)


# ---- the server side -------------------------------------------------------------------------------

def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, 4)
    size = int.from_bytes(data[:4], "big")
    body = data[4:]
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ConnectionError("request cut short")
        body += chunk
    return json.loads(body), fds


def _run_child(request: dict, fds: list[int]) -> int:
    """In the forked child: become the requested process, run it, and return its exit status."""
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDONLY)
    for target, fd in ((0, devnull), (1, fds[0]), (2, fds[1])):
        os.dup2(fd, target)
    for fd in (devnull, *fds):
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import runpy

    code = 0
    try:
        if request.get("module"):
            sys.argv = [request["module"], *request["args"]]
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        else:
            sys.argv = [request["script"], *request["args"]]
            runpy.run_path(request["script"], run_name="__main__")
    except SystemExit as e:  # as the interpreter exits on it: None is 0, any other non-int is printed and 1
        code = 0 if e.code is None else e.code
        if not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    try:  # what the interpreter does at exit: wait for non-daemon threads, then atexit handlers
        threading._shutdown()
        import atexit

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    return code


def serve(path: str, parent_pid: int) -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    baseline = _threads()  # importing torch starts a short-lived native thread (a fork does not copy it)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    waiting: dict[int, socket.socket] = {}  # child pid -> the connection that asked for it
    print("ready", flush=True)
    while os.getppid() == parent_pid:
        readable, _, _ = select.select([listener], [], [], 0.2)
        if readable:
            conn, _ = listener.accept()
            try:
                request, fds = _receive(conn)
            except (OSError, ValueError, ConnectionError):
                conn.close()
                continue
            if _threads() > baseline:
                print(f"fork server: {_threads()} threads, {baseline} after imports: not forking", file=sys.stderr)
                conn.sendall(b"refused: the fork server started threads\n")
                conn.close()
                for fd in fds:
                    os.close(fd)
                continue
            pid = os.fork()
            if pid == 0:
                listener.close()
                conn.close()
                for other in waiting.values():
                    other.close()
                os._exit(_run_child(request, fds))
            for fd in fds:
                os.close(fd)
            try:
                conn.sendall(f"pid {pid}\n".encode())
            except OSError:
                pass
            waiting[pid] = conn
        while waiting:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = waiting.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:
                    pass
                conn.close()


# ---- the test side ---------------------------------------------------------------------------------

class ForkedProcess:
    """A child of the fork server, driven like a subprocess.Popen (the parts tests use)."""

    def __init__(self, conn: socket.socket, pid: int, args: list[str], stdout, stderr=None) -> None:
        self._conn, self.pid, self.args, self.stdout, self.stderr = conn, pid, args, stdout, stderr
        self.stdin = None
        self.returncode: int | None = None
        self._buffer = b""
        self._lock = threading.Lock()

    def _read_exit(self, timeout: float | None) -> None:
        with self._lock:
            if self.returncode is not None:
                return
            deadline = None if timeout is None else time.monotonic() + timeout
            while b"\n" not in self._buffer:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not select.select([self._conn], [], [], left)[0]:
                    return
                chunk = self._conn.recv(64)
                if not chunk:  # the fork server is gone (its children went to init): ask the kernel
                    while _alive(self.pid):
                        if deadline is not None and time.monotonic() > deadline:
                            return
                        time.sleep(0.05)
                    self.returncode = UNKNOWN_EXIT
                    return
                self._buffer += chunk
            self.returncode = int(self._buffer.split(b"\n", 1)[0].split()[1])
            self._conn.close()

    def poll(self) -> int | None:
        self._read_exit(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._read_exit(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


class ForkServer:
    """One fork server process for this test process; `spawn` has local_swarm.launch_node's shape."""

    def __init__(self, workdir: Path) -> None:
        self.path = str(workdir / "forkserver.sock")
        root = Path(__file__).resolve().parents[2]
        self.env = dict(os.environ)
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.forkserver", self.path, str(os.getpid())],
                                     cwd=root, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                     start_new_session=True)
        self._ready = threading.Event()
        self._ok = False

        def wait_ready() -> None:
            self._ok = self.proc.stdout.readline().strip() == "ready"
            self._ready.set()

        threading.Thread(target=wait_ready, daemon=True).start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def _usable(self, env: dict) -> bool:
        if not self._ready.wait(START_TIMEOUT_S) or not self._ok or self.proc.poll() is not None:
            return False
        changed = {k for k in env.keys() | self.env.keys() if env.get(k) != self.env.get(k)}
        return not any(k.startswith(IMPORT_TIME_ENV) for k in changed)

    def spawn(self, cmd: list[str], *, stdout, stderr, env: dict | None = None, cwd=None, **kwargs):
        """Start `cmd` (`python -m MODULE ...` or `python tests/helpers/faulty_server.py ...`) as a fork
        of the server when it can be, else as subprocess.Popen(cmd, ...). A fork needs stdout=PIPE (read
        as text) and stderr PIPE or a file."""
        env = dict(os.environ) if env is None else env
        request = self._request(cmd, env, str(cwd or os.getcwd()))
        forked = None
        if (request is not None and stdout == subprocess.PIPE and (stderr == subprocess.PIPE or hasattr(stderr, "fileno"))
                and set(kwargs.items()) <= {("text", True), ("start_new_session", True)} and self._usable(env)):
            forked = self._fork(cmd, request, stderr)
        return forked or subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env, cwd=cwd, **kwargs)

    def _fork(self, cmd: list[str], request: dict, stderr) -> ForkedProcess | None:
        """Ask the server for the child; None if it refused or is gone."""
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe() if stderr == subprocess.PIPE else (None, stderr.fileno())
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self.path)
            body = json.dumps(request).encode()
            socket.send_fds(conn, [len(body).to_bytes(4, "big") + body], [out_write, err_write])
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = conn.recv(64)
                if not chunk:
                    break
                reply += chunk
        except OSError:
            reply = b""
        finally:
            os.close(out_write)
            if err_read is not None:
                os.close(err_write)
        if not reply.startswith(b"pid "):
            conn.close()
            for fd in (out_read, err_read):
                if fd is not None:
                    os.close(fd)
            return None
        return ForkedProcess(conn, int(reply.split()[1]), cmd, os.fdopen(out_read, "r"),
                             None if err_read is None else os.fdopen(err_read, "r"))

    @staticmethod
    def _request(cmd: list[str], env: dict, cwd: str) -> dict | None:
        if len(cmd) < 2 or cmd[0] != sys.executable:
            return None
        if cmd[1] == "-m" and len(cmd) >= 3:
            return {"module": cmd[2], "args": cmd[3:], "env": env, "cwd": cwd}
        if os.path.basename(cmd[1]) in FORKABLE_SCRIPTS:
            return {"script": cmd[1], "args": cmd[2:], "env": env, "cwd": cwd}
        return None


active: ForkServer | None = None  # this test process's fork server (tests/conftest.py)


def popen(cmd: list[str], **kwargs):
    """subprocess.Popen, forked from the active fork server where it can be."""
    return (active.spawn if active else subprocess.Popen)(cmd, **kwargs)


def run(cmd: list[str], *, timeout: float, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True, timeout=...), forked where it can be."""
    if active is None:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    proc = active.spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd, text=True)
    if isinstance(proc, subprocess.Popen):
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    texts: dict[str, str] = {}
    readers = [threading.Thread(target=lambda name=name, f=f: texts.__setitem__(name, f.read()), daemon=True)
               for name, f in (("out", proc.stdout), ("err", proc.stderr))]
    for reader in readers:
        reader.start()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    for reader in readers:
        reader.join(10)
    proc.stdout.close()
    proc.stderr.close()
    return subprocess.CompletedProcess(cmd, proc.returncode, texts.get("out", ""), texts.get("err", ""))


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
