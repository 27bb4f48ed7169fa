"""The team's stack, for real, on 127.0.0.1: PostgreSQL, an S3 endpoint and an authenticated MLflow server.

:class:`Stack` starts, each on a free port of 127.0.0.1 and each in a process group of its own:

- a private PostgreSQL 15 (data and unix socket in a temporary folder; password login for the role
  ``mlflow``, owner of the databases ``mlflow`` (runs, models) and ``mlflow_auth`` (users, grants));
- moto's S3 server with one bucket, the artifact store;
- ``mlflow server --app-name basic-auth``, which proxies artifacts to that bucket.

Each part can be stopped, killed and started again on its own, so a test can take one down while a
client runs; everything stops when the ``with`` block ends, however it ends, and the temporary
folders go with it. Should this process die without ending the block (SIGKILL, a closed terminal),
a watchdog (:class:`mnist_vae.procs.Watchdog`) stops every part and removes the temporary folders.
PostgreSQL is stopped with ``pg_ctl stop``, by this process and by the watchdog alike. Logs go to
``postgres.log``, ``s3.log``, ``mlflow.log`` and ``watchdog.log`` in the work folder; no password is
ever passed on a command line or written to a log. :func:`serve_forever` is the same stack for a
person: it prints the ``export`` lines a client needs and runs until Ctrl-C.

Modules: :mod:`.server` (what every part shares: process, log, watchdog registration, stop),
:mod:`.postgres`, :mod:`.s3` and :mod:`.mlflow_server` (one part each), :mod:`.team` (the stack as a
whole).
"""

from mnist_vae.stack.mlflow_server import PermissionName, ResourceType
from mnist_vae.stack.s3 import FAKE_AWS
from mnist_vae.stack.server import Part, StackError
from mnist_vae.stack.team import Stack, serve_forever

__all__ = ["FAKE_AWS", "Part", "PermissionName", "ResourceType", "Stack", "StackError", "serve_forever"]
