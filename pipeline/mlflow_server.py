"""`python -m pipeline.mlflow_server`: the MLflow tracking server for a cluster, behind
MLflow's basic-auth app, and the credentials its clients use.

The credentials live in one file readable only by its owner (`~/.config/musicgen/
mlflow-credentials`, or $MUSICGEN_MLFLOW_CREDENTIALS): `username` and `password` lines,
made with a random password the first time. They never go into the repository, the
config or a job script: the submitter reads the file and passes them to its jobs in the
environment (MLFLOW_TRACKING_USERNAME / _PASSWORD, which sbatch exports and MLflow's
client reads). A request without them is refused (401).
"""
from __future__ import annotations

import argparse
import os
import secrets
import stat
import subprocess
import sys
from pathlib import Path
from typing import Optional

CREDENTIALS_ENV = "MUSICGEN_MLFLOW_CREDENTIALS"
USER_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


class CredentialsError(ValueError):
    """A credentials file that is missing a field or that others can read."""


def credentials_file() -> Path:
    default = Path.home() / ".config" / "musicgen" / "mlflow-credentials"
    return Path(os.environ.get(CREDENTIALS_ENV) or default)


def make_credentials(path: Path, username: str = "admin") -> None:
    """Write a new credentials file (mode 600) with a random password."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"username = {username}\npassword = {secrets.token_urlsafe(24)}\n")


def read_credentials(path: Optional[Path] = None) -> tuple[str, str]:
    """(username, password) from the file; refused if group or others may read it."""
    path = path or credentials_file()
    if not path.is_file():
        raise CredentialsError(f"{path}: no MLflow credentials file (the server makes one "
                               f"when it first starts: make mlflow-server)")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialsError(f"{path}: others can read these credentials; chmod 600 {path}")
    fields = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    if not fields.get("username") or not fields.get("password"):
        raise CredentialsError(f"{path}: needs 'username = ...' and 'password = ...' lines")
    return fields["username"], fields["password"]


def export_credentials(tracking_uri: str) -> bool:
    """For an http(s) tracking server, put the credentials into this process's environment
    (inherited by local steps, exported by sbatch to SLURM jobs) unless they are there
    already; True when they are set. A missing file is not an error: the server may be
    open (then requests simply carry no credentials)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return False
    if os.environ.get(USER_ENV) and os.environ.get(PASSWORD_ENV):
        return True
    path = credentials_file()
    if not path.exists():
        return False
    os.environ[USER_ENV], os.environ[PASSWORD_ENV] = read_credentials(path)
    return True


def auth_config(folder: Path, username: str) -> Path:
    """The auth app's ini file (no password in it: the admin's comes from the environment)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / "basic_auth.ini"
    path.write_text("[mlflow]\ndefault_permission = READ\n"
                    f"database_uri = sqlite:///{folder.resolve() / 'basic_auth.db'}\n"
                    f"admin_username = {username}\n"
                    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    return path


def server_command(root: Path, host: str, port: int) -> list[str]:
    mlflow = Path(sys.executable).with_name("mlflow")
    return [str(mlflow), "server", "--app-name", "basic-auth",
            "--backend-store-uri", f"sqlite:///{root.resolve() / 'mlflow-server.db'}",
            "--artifacts-destination", str(root.resolve() / "mlartifacts"),
            "--host", host, "--port", str(port), "--workers", "4",
            "--allowed-hosts", os.environ.get("MLFLOW_ALLOWED_HOSTS", "*")]


def serve(root: Path, host: str, port: int) -> int:
    """Run the server in the foreground (credentials made on first use)."""
    path = credentials_file()
    if not path.exists():
        make_credentials(path)
        print(f"[mlflow-server] new credentials in {path} (mode 600)", file=sys.stderr)
    username, password = read_credentials(path)
    env = dict(os.environ, MLFLOW_AUTH_CONFIG_PATH=str(auth_config(root / ".mlflow-auth", username)),
               MLFLOW_AUTH_ADMIN_PASSWORD=password)
    env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_urlsafe(32))  # CSRF, per start
    print(f"[mlflow-server] http://{host}:{port} (basic auth, user {username}); jobs log here "
          f"with OVERRIDES=mlflow.tracking_uri=http://$(hostname -f):{port}", file=sys.stderr)
    return subprocess.run(server_command(root, host, port), env=env).returncode


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("runs"), help="where the store lives")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    try:
        return serve(args.root, args.host, args.port)
    except CredentialsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
