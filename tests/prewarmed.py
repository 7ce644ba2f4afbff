"""Training launches for the tests, forked from one server that has already imported the stack.

A ``python -m cpt.train`` process spends about 8 of its first seconds importing llm-foundry and Composer; the
resume and stages tests launch dozens. Here one server process imports them once, and each launch is a
``fork`` of it. A launch is still a real process of its own: its own pid and session (``setsid``, as
``start_new_session=True``), working folder, environment and argv; stdout and stderr go into a pipe the test
reads; it is killed by real signals; it ends through the interpreter's normal exit (non-daemon threads joined,
``atexit`` handlers run) with the exit code a fresh interpreter would give. The server reaps it at once, so a
killed launch is gone as it would be for ``subprocess.Popen``.

What a fork cannot give, the tests that need it keep from a plain interpreter: the command line's own start-up
(``cpt.run.cpu.apply_on_cpu``'s re-execution), ``composer -n 2``, and settings read when a library loads
(``OMP_NUM_THREADS``). ``Launch`` offers the part of ``subprocess.Popen`` the tests use.

    python tests/prewarmed.py SOCKET    # the server (started by ``Server.start``; exits when its stdin closes)
"""

from __future__ import annotations

import atexit
import functools
import importlib
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading

PRELOAD = (
    "cpt.train", "llmfoundry.command_utils", "cpt.run.plan", "composer.trainer", "transformers", "cpt.data.convert",
    "cpt.data.file_task", "streaming",
)  # fmt: skip


class Launch:
    """One forked launch: ``pid``, ``stdout`` (text), ``poll``, ``wait``, ``communicate``, ``returncode``."""

    def __init__(self, conn: socket.socket, read_fd: int):
        self._conn, self._buf, self.returncode = conn, b"", None
        self.pid = int(self._line(None))
        self.stdout = os.fdopen(read_fd, "r", encoding="utf-8", errors="replace")

    def _line(self, timeout: float | None) -> str:
        self._conn.settimeout(timeout)
        while b"\n" not in self._buf:
            chunk = self._conn.recv(64)
            if not chunk:
                raise RuntimeError("the prewarmed launch server closed the connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self.returncode = int(self._line(0.0))
            except (BlockingIOError, TimeoutError):
                return None
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                self.returncode = int(self._line(timeout))
            except TimeoutError:
                raise subprocess.TimeoutExpired(f"launch {self.pid}", timeout) from None
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        """All of stdout (until every process holding the pipe closed it), then the exit code."""
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.append(self.stdout.read()), daemon=True)
        reader.start()
        reader.join(timeout)
        if reader.is_alive():
            raise subprocess.TimeoutExpired(f"launch {self.pid}", timeout)
        self.stdout.close()
        self.wait(timeout)
        return out[0], None


class Server:
    """The server process (started at the first launch); ``launch`` forks one run from it."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="cpt-prewarmed-")  # short: a socket's path has at most 107 bytes
        self.path = os.path.join(self.folder, "server.sock")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, self.path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        ready = self.proc.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"the prewarmed launch server did not start: {ready!r}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()  # the server exits when its stdin closes
            self.proc.wait(timeout=30)
            self.proc = None
        shutil.rmtree(self.folder, ignore_errors=True)

    def launch(self, argv: list[str], cwd: str, env: dict[str, str]) -> Launch:
        """``argv`` as after the interpreter: ``["-m", module, *args]``, ``["-c", code, *args]`` or
        ``[script.py, *args]``."""
        if self.proc is None:
            self.start()
        read_fd, write_fd = os.pipe()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self.path)
            body = json.dumps({"argv": argv, "cwd": str(cwd), "env": env}).encode()
            socket.send_fds(conn, [struct.pack("!Q", len(body))], [write_fd])
            conn.sendall(body)
        finally:
            os.close(write_fd)
        return Launch(conn, read_fd)


def run(argv: list[str], cwd: str, env: dict[str, str], timeout: float = 900) -> tuple[int, str]:
    """One launch to its end, as ``subprocess.run``: its exit code and its stdout and stderr together."""
    proc = shared().launch(argv, cwd=cwd, env=env)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


@functools.cache
def shared() -> Server:
    """This test session's server, stopped when the session's interpreter exits."""
    server = Server()
    atexit.register(server.stop)
    return server


def _receive(conn: socket.socket) -> tuple[dict, int]:
    head, fds, _, _ = socket.recv_fds(conn, 8, 1)
    head += _exactly(conn, 8 - len(head))
    (size,) = struct.unpack("!Q", head)
    return json.loads(_exactly(conn, size)), fds[0]


def _exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("a launch request ended early")
        data += chunk
    return data


def _serve(path: str):
    """Import the stack, then answer launch requests; returns only in a forked child, with its request."""
    for name in PRELOAD:
        importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    waiting: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, the connection to answer)
    while True:
        readable, _, _ = select.select([sys.stdin, listener, *waiting], [], [])
        for ready in readable:
            if ready is sys.stdin:
                if not sys.stdin.readline():  # the test session ended
                    listener.close()
                    os.unlink(path)
                    return None
            elif ready is listener:
                conn, _ = listener.accept()
                try:
                    request, out_fd = _receive(conn)
                except (ConnectionError, ValueError, IndexError):  # a broken request: the server stays up
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    conn.close()
                    for _, other in waiting.values():
                        other.close()
                    return request, out_fd
                os.close(out_fd)
                conn.sendall(f"{pid}\n".encode())
                waiting[os.pidfd_open(pid)] = (pid, conn)
            else:
                pid, conn = waiting.pop(ready)
                _, status = os.waitpid(pid, 0)
                os.close(ready)
                try:
                    conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:  # the test stopped listening
                    pass
                conn.close()


def _become(request: dict, out_fd: int) -> None:
    """In the forked child: the process a fresh ``python ARGV`` started in ``cwd`` with ``env`` would be."""
    import random
    import runpy

    os.setsid()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    os.close(devnull)
    os.close(out_fd)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - fd 0 is the process's, as in a fresh interpreter
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    tempfile.tempdir = None  # read TMPDIR again
    random.seed()
    if request["argv"][0].endswith(".py"):  # python SCRIPT ARGS
        sys.argv = request["argv"]
        sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
        runpy.run_path(sys.argv[0], run_name="__main__")
        return
    flag, target, *args = request["argv"]
    sys.path[0] = os.getcwd() if flag == "-m" else ""  # as the interpreter sets it (not this file's folder)
    if flag == "-m":
        sys.argv = [target, *args]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    elif flag == "-c":
        sys.argv = ["-c", *args]
        exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
    else:
        raise SystemExit(f"prewarmed: unsupported argv {request['argv'][:2]}")


if __name__ == "__main__":
    child = _serve(sys.argv[1])
    if child is not None:
        _become(*child)  # a normal interpreter exit follows, with the launch's own exit code
