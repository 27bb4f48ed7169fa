"""The stack's S3 endpoint: moto's S3 server with one bucket, the artifact store.

moto keeps its state in memory: after a stop or a kill the bucket is created again, empty. It
accepts any credentials; the stack and its clients use the values moto's documentation uses.
"""

from __future__ import annotations

import sys

import requests

from mnist_vae import procs
from mnist_vae.stack.server import Server, Site, child_env, http_url

FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def s3_client(endpoint_url: str):  # -> botocore S3 client; boto3 ships no static type for it
    """A boto3 S3 client for the endpoint ``endpoint_url``, with the stack's credentials."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=FAKE_AWS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_AWS["AWS_SECRET_ACCESS_KEY"],
        region_name=FAKE_AWS["AWS_DEFAULT_REGION"],
    )


class S3(Server):
    """moto's S3 server on ``port`` of 127.0.0.1, with the bucket ``bucket``."""

    name = "s3"
    requires = (("moto", "moto[server]"), ("flask_cors", "moto[server]"), ("boto3", "boto3"))

    def __init__(self, site: Site, port: int, *, bucket: str) -> None:
        super().__init__(site, port)
        self.bucket = bucket

    @property
    def endpoint_url(self) -> str:
        return http_url(self.port)

    def start(self) -> None:
        """Starts moto's S3 server and creates the bucket.

        moto keeps its state in memory: after a stop or kill the bucket is created again, empty.

        Raises:
            StackError: It exited or did not answer within the start timeout.
        """
        argv = [sys.executable, "-m", "moto.server", "-H", procs.HOST, "-p", str(self.port)]
        self._spawn(argv, {**child_env(), **FAKE_AWS})
        self._wait(self._answers, "answer HTTP")
        s3_client(self.endpoint_url).create_bucket(Bucket=self.bucket)

    def _answers(self) -> bool:
        try:
            requests.get(self.endpoint_url, timeout=2)
        except (requests.ConnectionError, requests.Timeout):  # not up yet, or slow on a busy machine
            return False
        return True
