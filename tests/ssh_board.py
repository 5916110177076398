"""A Linux "board" for the tests: an SSH server on 127.0.0.1 (asyncssh) in a background thread.

    board = SshBoard(tmp_path).start()     # key auth only, its own host key, SFTP chrooted to root
    board.backend_node()                   # {name: ssh, host, port, user, key, known_hosts, python}
    board.stop(); board.start()            # the same port and host key again

Commands run with /bin/sh in ``board.root`` (the board's home); ``on_exec(command)`` is called
as each one starts, so a test can act in the middle of a case. stop() closes the listener,
aborts every connection and kills the commands still running, as a board losing power would.
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from pathlib import Path

import asyncssh


class SshBoard:
    def __init__(self, tmp_path: Path, user: str = "bench"):
        self.dir = Path(tmp_path) / "board"
        self.root = self.dir / "home"
        self.root.mkdir(parents=True, exist_ok=True)
        self.user, self.port = user, 0
        host_key, client_key = asyncssh.generate_private_key("ssh-ed25519"), asyncssh.generate_private_key("ssh-ed25519")
        host_key.write_private_key(str(self.dir / "host_key"))
        client_key.write_private_key(str(self.dir / "client_key"))
        os.chmod(self.dir / "client_key", 0o600)
        client_key.write_public_key(str(self.dir / "authorized_keys"))
        self.host_public = host_key.export_public_key().decode().strip()
        self.on_exec = None
        self.commands: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="ssh-board")
        self._thread.start()
        self._server = None
        self._conns: set = set()
        self._procs: set = set()

    # -- the server ------------------------------------------------------------------------
    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    async def _handle(self, process) -> None:
        command = process.command or "true"
        self.commands.append(command)
        if self.on_exec is not None:
            self.on_exec(command)
        proc = await asyncio.create_subprocess_shell(command, cwd=self.root, stdout=asyncio.subprocess.PIPE,
                                                     stderr=asyncio.subprocess.PIPE, start_new_session=True)
        self._procs.add(proc)
        try:
            out, err = await proc.communicate()
        finally:
            self._procs.discard(proc)
        try:
            process.stdout.write(out.decode(errors="replace"))
            process.stderr.write(err.decode(errors="replace"))
            process.exit(proc.returncode if proc.returncode >= 0 else 128 - proc.returncode)
        except (OSError, asyncssh.Error):
            pass                                                  # the connection went away meanwhile

    def start(self) -> "SshBoard":
        board = self

        class Server(asyncssh.SSHServer):
            def connection_made(self, conn):
                board._conns.add(conn)

            def connection_lost(self, exc):
                pass

        async def serve():
            return await asyncssh.create_server(
                Server, "127.0.0.1", self.port, server_host_keys=[str(self.dir / "host_key")],
                authorized_client_keys=str(self.dir / "authorized_keys"), process_factory=self._handle,
                sftp_factory=lambda chan: asyncssh.SFTPServer(chan, chroot=str(self.root).encode()),
                allow_scp=False, password_auth=False, kbdint_auth=False)

        self._server = self._call(serve())
        self.port = self._server.sockets[0].getsockname()[1]
        (self.dir / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {self.host_public}\n")
        return self

    def stop(self) -> None:
        async def down():
            self._server.close()
            for conn in list(self._conns):
                conn.abort()
            self._conns.clear()
            for proc in list(self._procs):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            await self._server.wait_closed()

        if self._server is not None:
            self._call(down())
            self._server = None

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def backend_node(self, **extra) -> dict:
        return {"name": "ssh", "host": "127.0.0.1", "port": self.port, "user": self.user,
                "key": str(self.dir / "client_key"), "known_hosts": str(self.dir / "known_hosts"),
                "python": sys.executable, "connect_timeout_s": 5, **extra}
