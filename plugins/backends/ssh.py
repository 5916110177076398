"""``ssh``: a Linux board (Jetson, Raspberry Pi, RK3588, any host with Python) over SSH.

    backend: {name: ssh, host: 192.0.2.7, user: pi, key: ~/.ssh/id_ed25519, python: python3}

The board needs Python 3 with numpy, onnxruntime and Pillow (``pip install numpy onnxruntime
pillow``); nothing of bluelm_v. load() builds the configured model here, exports it
(plugins/backends/export.py), pushes the export and the runner (bluelm_v/runner.py) to
``remote_dir``; run_case() runs the runner there (plugins/backends/device_runner.py).

Transport (asyncssh, ``pip install 'bluelm-v[devices]'``): key authentication (``key``; else the
SSH agent and ~/.ssh's default keys), host keys checked against ``known_hosts`` (default
~/.ssh/known_hosts; ``check_host_key: false`` turns the check off and says so in describe()),
``connect_timeout_s`` on connecting and ``timeout_s`` on every command, keep-alives every
``keepalive_s``: a board that stops answering fails the command instead of hanging it.
"""
from __future__ import annotations

import asyncio
import os
import threading

from .device_runner import RunnerBackend
from .transport import FACTS_COMMAND, Completed, TransportError, parse_facts, quote


class SshTransport:
    """One SSH connection (asyncssh) driven from synchronous code through a private event loop."""

    name = "ssh"

    def __init__(self, host: str, port: int = 22, user: str | None = None, key: str | None = None,
                 known_hosts: str | None = None, check_host_key: bool = True, connect_timeout_s: float = 15.0,
                 keepalive_s: float = 5.0):
        self.host, self.port, self.user = host, int(port), user
        self.key = os.path.expanduser(key) if key else None
        self.known_hosts = os.path.expanduser(known_hosts) if known_hosts else None
        self.check_host_key, self.connect_timeout_s, self.keepalive_s = check_host_key, connect_timeout_s, keepalive_s
        self._conn = self._loop = self._thread = None

    @property
    def where(self) -> str:
        return f"{self.user + '@' if self.user else ''}{self.host}:{self.port}"

    # -- the event loop ------------------------------------------------------------------------
    def _call(self, coro, timeout: float | None = None):
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name=f"ssh-{self.host}")
            self._thread.start()
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(None if timeout is None else timeout + 5)

    def _lost(self, what: str, exc: BaseException) -> TransportError:
        """Forget the connection (the next call reconnects) and say what was lost."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._loop.call_soon_threadsafe(conn.abort)
        return TransportError(f"ssh {self.where}: {what}: {type(exc).__name__}: {exc}".rstrip(": "))

    # -- the interface -------------------------------------------------------------------------
    def connect(self) -> None:
        if self._conn is not None:
            return
        try:
            import asyncssh
        except ImportError:
            raise TransportError("the ssh backend needs asyncssh: pip install 'bluelm-v[devices]'", False) from None
        if self.check_host_key and self.known_hosts and not os.path.exists(self.known_hosts):
            raise TransportError(f"backend.known_hosts: {self.known_hosts} does not exist", False)
        options = {"username": self.user, "port": self.port, "connect_timeout": self.connect_timeout_s,
                   "keepalive_interval": self.keepalive_s, "keepalive_count_max": 3,
                   "known_hosts": (self.known_hosts or ()) if self.check_host_key else None}
        if self.key:
            if not os.path.exists(self.key):
                raise TransportError(f"backend.key: {self.key} does not exist", False)
            options["client_keys"] = [self.key]
        async def connect():
            return await asyncssh.connect(self.host, **options)

        try:
            self._conn = self._call(connect(), self.connect_timeout_s)
        except asyncssh.HostKeyNotVerifiable as exc:
            raise TransportError(f"ssh {self.where}: host key not trusted ({exc}); add the board to "
                                 f"{self.known_hosts or '~/.ssh/known_hosts'} (ssh-keyscan -p {self.port} {self.host}) "
                                 f"or set backend.known_hosts", False) from None
        except asyncssh.PermissionDenied as exc:
            raise TransportError(f"ssh {self.where}: authentication failed ({exc}); check backend.user and backend.key",
                                 False) from None
        except (OSError, asyncssh.Error, asyncio.TimeoutError, TimeoutError) as exc:
            raise self._lost("cannot connect", exc) from None

    def run(self, command: str, timeout: float) -> Completed:
        import asyncssh

        self.connect()
        try:
            done = self._call(self._conn.run(command, check=False, timeout=timeout), timeout)
        except (asyncssh.TimeoutError, asyncio.TimeoutError, TimeoutError) as exc:
            raise self._lost(f"'{command[:80]}' did not finish in {timeout:g} s", exc) from None
        except (OSError, asyncssh.Error) as exc:
            raise self._lost("connection lost", exc) from None
        if done.exit_status is None:                # the channel closed without an exit status
            raise self._lost("connection lost", ConnectionError(f"no exit status ({done.exit_signal})"))
        return Completed(done.exit_status, done.stdout or "", done.stderr or "")

    def _sftp(self, op: str, src: str, dst: str, timeout: float = 600.0) -> None:
        import asyncssh

        self.connect()

        async def transfer():
            async with self._conn.start_sftp_client() as sftp:
                await (sftp.put(src, dst) if op == "put" else sftp.get(src, dst))

        try:
            self._call(asyncio.wait_for(transfer(), timeout), timeout)
        except (asyncio.TimeoutError, TimeoutError) as exc:
            raise self._lost(f"copying {src} did not finish in {timeout:g} s", exc) from None
        except asyncssh.SFTPError as exc:
            raise TransportError(f"ssh {self.where}: copying {src} -> {dst}: {exc}", False) from None
        except (OSError, asyncssh.Error) as exc:
            raise self._lost(f"copying {src}", exc) from None

    def push(self, local: str, remote: str) -> None:
        parent = os.path.dirname(remote.rstrip("/"))
        if parent:
            self.run(f"mkdir -p {quote(parent)}", 60)
        self._sftp("put", str(local), remote)

    def pull(self, remote: str, local: str) -> None:
        self._sftp("get", remote, str(local))

    def facts(self) -> dict:
        return parse_facts(self.run(FACTS_COMMAND, 60).stdout)

    def close(self) -> None:
        if self._conn is not None:
            self._loop.call_soon_threadsafe(self._conn.close)
            self._conn = None
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop = self._thread = None


class SshBackend(RunnerBackend):
    """A Linux board over SSH running the device runner on its CPU with ONNX Runtime."""

    def __init__(self, host: str = "127.0.0.1", port: int = 22, user: str | None = None, key: str | None = None,
                 known_hosts: str | None = None, check_host_key: bool = True, python: str = "python3",
                 remote_dir: str = "bluelm_v", connect_timeout_s: float = 15.0, keepalive_s: float = 5.0,
                 **runner_options):
        transport = SshTransport(host, port, user, key, known_hosts, check_host_key, connect_timeout_s, keepalive_s)
        super().__init__(transport, python=python, remote_dir=remote_dir, **runner_options)

    def describe(self) -> dict:
        out = super().describe()
        out.update(host=self.transport.where, host_key_checked=self.transport.check_host_key)
        return out
