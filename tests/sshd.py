"""A real OpenSSH server for tests and benchmarks, on 127.0.0.1 and a free port.

``running_sshd(tmpdir)`` generates a fresh ed25519 host key and user keys (ed25519, RSA and
a passphrase-protected ed25519), writes an ``sshd_config`` that accepts only those keys for
the current user, starts ``/usr/sbin/sshd -D -e``, waits (bounded) until it answers with an
SSH banner, and terminates it on exit. Used by ``tests/test_ssh_exec.py`` and
``bench/ssh.py`` (which imports this file by path).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"
KEY_PASSPHRASE = "correct horse battery staple"
START_TIMEOUT_S = 10.0
PID_NAMESPACE = ["unshare", "--pid", "--kill-child"]  # sshd is the namespace's pid 1


def sshd_available() -> bool:
    return os.access(SSHD, os.X_OK)


@dataclass(frozen=True)
class SshServer:
    host: str
    port: int
    user: str
    key: str  # ed25519, no passphrase
    rsa_key: str
    encrypted_key: str  # ed25519, passphrase KEY_PASSPHRASE
    known_hosts: str  # "[127.0.0.1]:PORT ssh-ed25519 ..."
    host_public_key: str  # "ssh-ed25519 AAAA..."
    directory: Path
    log: Path
    pid: int

    def other_host_key_line(self) -> str:
        """A known_hosts line for this host and port with a DIFFERENT ed25519 key."""
        path = self.directory / "other_host_key"
        if not path.exists():
            _keygen(path, "ed25519")
        public = Path(f"{path}.pub").read_text().split()
        return f"[{self.host}]:{self.port} {public[0]} {public[1]}\n"


def _keygen(path: Path, kind: str, passphrase: str = "") -> None:
    args = ["ssh-keygen", "-q", "-t", kind, "-N", passphrase, "-f", str(path), "-C", "cronfile"]
    if kind == "rsa":
        args[4:4] = ["-b", "2048"]
    subprocess.run(args, check=True, stdin=subprocess.DEVNULL, capture_output=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_banner(host: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), 1) as s:
            s.settimeout(1)
            if s.recv(64).startswith(b"SSH-"):
                return
        time.sleep(0.05)
    raise RuntimeError(f"sshd did not answer on {host}:{port} in {START_TIMEOUT_S}s: "
                       f"{log.read_text()}")


@contextlib.contextmanager
def running_sshd(directory: Path | str, pid_namespace: bool = False) -> Iterator[SshServer]:
    """``pid_namespace``: run sshd (as root) in a PID namespace of its own, so the process
    numbers its sessions see are not this host's: a "remote" process group number then
    names a different group (or none) here, as on a real remote host."""
    d = Path(directory).resolve()
    d.mkdir(parents=True, exist_ok=True)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    host_key = d / "ssh_host_ed25519_key"
    _keygen(host_key, "ed25519")
    keys = {"key": d / "id_ed25519", "rsa_key": d / "id_rsa", "encrypted_key": d / "id_enc"}
    _keygen(keys["key"], "ed25519")
    _keygen(keys["rsa_key"], "rsa")
    _keygen(keys["encrypted_key"], "ed25519", KEY_PASSPHRASE)
    authorized = d / "authorized_keys"
    authorized.write_text("".join(Path(f"{k}.pub").read_text() for k in keys.values()))
    host, port = "127.0.0.1", _free_port()
    config = d / "sshd_config"
    config.write_text(
        f"Port {port}\n"
        f"ListenAddress {host}\n"
        f"HostKey {host_key}\n"
        f"PidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {authorized}\n"
        "PermitRootLogin prohibit-password\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "StrictModes no\n"
        "MaxStartups 100:30:200\n"
        "LogLevel ERROR\n"
    )
    host_public = Path(f"{host_key}.pub").read_text().split()
    known_hosts = d / "known_hosts"
    known_hosts.write_text(f"[{host}]:{port} {host_public[0]} {host_public[1]}\n")
    log = d / "sshd.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [*PID_NAMESPACE, SSHD, "-D", "-e", "-f", str(config)] if pid_namespace
            else [SSHD, "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_banner(host, port, proc, log)
        yield SshServer(
            host=host, port=port, user=getpass.getuser(),
            key=str(keys["key"]), rsa_key=str(keys["rsa_key"]),
            encrypted_key=str(keys["encrypted_key"]),
            known_hosts=str(known_hosts), host_public_key=" ".join(host_public[:2]),
            directory=d, log=log, pid=proc.pid,
        )
    finally:
        # unshare does not pass SIGTERM on to its child; SIGKILL ends it, and --kill-child
        # then ends sshd (the namespace's pid 1) and with it every session in the namespace.
        if pid_namespace:
            proc.kill()
        else:
            proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
