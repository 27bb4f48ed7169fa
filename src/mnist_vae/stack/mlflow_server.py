"""The stack's tracking server: ``mlflow server --app-name basic-auth`` on PostgreSQL, proxying
artifacts to the S3 bucket.

Runs, models and experiments go to the database ``mlflow``, users and grants to ``mlflow_auth``,
both owned by PostgreSQL's role ``mlflow``. No secret is written anywhere: the auth config
(``basic_auth.ini`` in the work folder) holds none, and the admin password, the database password and
the Flask secret key reach the server in its environment, the same for every start, so that users,
sessions and signed cookies survive a restart.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import requests

from mnist_vae import procs
from mnist_vae.stack.postgres import database_uri
from mnist_vae.stack.s3 import FAKE_AWS
from mnist_vae.stack.server import Server, Site, StackError, child_env, http_url

TRACKING_DB = "mlflow"
AUTH_DB = "mlflow_auth"

ResourceType = Literal["experiment", "registered_model", "prompt", "scorer"]
PermissionName = Literal["READ", "USE", "EDIT", "MANAGE", "DENY", "NO_PERMISSIONS"]


class MlflowServer(Server):
    """The MLflow tracking server with basic auth on ``port`` of 127.0.0.1.

    Args:
        site: The running stack's folders and watchdog.
        port: Its HTTP port.
        pg_port: PostgreSQL's port; the databases :data:`TRACKING_DB` and :data:`AUTH_DB` exist.
        database_password: The password of PostgreSQL's role ``mlflow``.
        s3_endpoint_url: The S3 endpoint holding ``bucket``, where the artifacts go.
        bucket: The artifact bucket.
        admin_username: The admin, created on the first start with ``admin_password``.
        admin_password: The admin's password.
        flask_secret_key: Signs sessions and CSRF tokens.
        default_permission: What a user may do on a resource nobody granted them.
    """

    name = "mlflow"
    requires = (("flask_wtf", "mlflow[auth]"),)

    def __init__(
        self,
        site: Site,
        port: int,
        *,
        pg_port: int,
        database_password: str,
        s3_endpoint_url: str,
        bucket: str,
        admin_username: str,
        admin_password: str,
        flask_secret_key: str,
        default_permission: PermissionName,
    ) -> None:
        super().__init__(site, port)
        self.admin_username = admin_username
        self._admin_password = admin_password
        # No secret in the auth config: the admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD and
        # the database password from PGPASSWORD.
        self._auth_config = (
            "[mlflow]\n"
            f"default_permission = {default_permission}\n"
            f"database_uri = {database_uri(pg_port, AUTH_DB)}\n"
            f"admin_username = {admin_username}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            # Without the cache every request hashes its password (0.3 s of the server's CPU on a
            # 2-core VM): one `evaluate` through the stack took 27 s instead of 10. With one worker a
            # password changed or a user deleted through the API is forgotten at once; only a change
            # made in the database directly waits out the minute.
            "auth_cache_ttl_seconds = 60\n"
        )
        self._settings = {
            **FAKE_AWS,
            "PGPASSWORD": database_password,
            "MLFLOW_S3_ENDPOINT_URL": s3_endpoint_url,
            "MLFLOW_AUTH_CONFIG_PATH": str(self.auth_config_path),
            "MLFLOW_AUTH_ADMIN_USERNAME": admin_username,
            "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
            # Fixed for the stack's life: sessions and CSRF tokens survive a server restart.
            "MLFLOW_FLASK_SERVER_SECRET_KEY": flask_secret_key,
            # The job runner (GenAI jobs) would add a huey consumer and a folder in /dev/shm.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
        }
        self._argv = [
            sys.executable, "-m", "mlflow", "server", "--host", procs.HOST, "--port", str(port),
            "--backend-store-uri", database_uri(pg_port, TRACKING_DB),
            "--artifacts-destination", f"s3://{bucket}/", "--serve-artifacts",
            "--app-name", "basic-auth", "--workers", "1",
        ]  # fmt: skip

    @property
    def tracking_uri(self) -> str:
        return http_url(self.port)

    @property
    def auth_config_path(self) -> Path:
        return self.site.workdir / "basic_auth.ini"

    def write_auth_config(self) -> None:
        """Writes ``basic_auth.ini``, which the server reads at each start."""
        self.auth_config_path.write_text(self._auth_config)

    def start(self) -> None:
        """Starts ``mlflow server`` with basic auth and returns once ``/health`` answers.

        Raises:
            StackError: It exited or did not answer within the start timeout.
        """
        self._spawn(self._argv, {**child_env(), **self._settings}, cwd=self.site.workdir)
        self._wait(self._answers, "answer /health")

    def create_user(self, username: str, password: str | None = None) -> str:
        """Creates a user through the server's REST API and returns its password.

        Args:
            username: The new user's name.
            password: Their password; ``None`` generates one.

        Raises:
            StackError: The server refused (the name is taken, for example).
        """
        password = password or secrets.token_urlsafe(16)
        self._admin_request(
            "POST", "/api/2.0/mlflow/users/create", {"username": username, "password": password}
        )
        return password

    def grant(
        self, username: str, resource_type: ResourceType, resource_id: str, permission: PermissionName
    ) -> None:
        """Grants ``username`` a permission on one resource, through the server's REST API.

        This MLflow (3.17) has one grant route for every kind of resource; the per-resource
        ``experiments/permissions/create`` routes of MLflow 2 are gone.

        Args:
            username: An existing user.
            resource_type: ``experiment`` (id), ``registered_model`` (name), ``prompt`` or ``scorer``.
            resource_id: The experiment id or the model's name; ``*`` for all of that type.
            permission: ``READ``, ``USE``, ``EDIT``, ``MANAGE``, ``DENY`` or ``NO_PERMISSIONS``.

        Raises:
            StackError: The server refused (an unknown user, resource type or permission).
        """
        body = {
            "username": username,
            "resource_type": resource_type,
            "resource_id": str(resource_id),
            "permission": permission,
        }
        self._admin_request("POST", "/api/3.0/mlflow/users/permissions/grant", body)

    def _admin_request(self, method: str, path: str, body: Mapping[str, str]) -> None:
        response = requests.request(
            method,
            self.tracking_uri + path,
            json=dict(body),
            auth=(self.admin_username, self._admin_password),
            timeout=30,
        )
        if not response.ok:
            raise StackError(
                f"MLflow answered {response.status_code} to {method} {path}: {response.text.strip()[:300]}"
            )

    def _answers(self) -> bool:
        try:
            return requests.get(self.tracking_uri + "/health", timeout=2).status_code == 200
        except (requests.ConnectionError, requests.Timeout):
            return False
