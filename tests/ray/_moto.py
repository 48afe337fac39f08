"""A local S3-compatible endpoint for the storage tests: moto's server on 127.0.0.1, one bucket, fake keys.

As in Ray's own storage tests: the server runs in a thread of the test process, on a free loopback port;
Ray workers reach it through `endpoint_override` in the storage URI and the AWS_* variables in their
environment (set before their Ray starts).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

BUCKET = "fipray-test"
ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_EC2_METADATA_DISABLED": "true"}


@contextlib.contextmanager
def moto_s3() -> Iterator[dict]:
    """{"endpoint": "127.0.0.1:PORT", "uri": callable(prefix) -> s3 URI, "env": AWS variables}; env set while open."""
    import boto3
    from moto.server import ThreadedMotoServer

    old = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"{host}:{port}"
        boto3.client("s3", endpoint_url=f"http://{endpoint}").create_bucket(Bucket=BUCKET)

        def uri(prefix: str, bucket: str = BUCKET) -> str:
            return f"s3://{bucket}/{prefix}?endpoint_override={endpoint}&scheme=http"

        yield {"endpoint": endpoint, "uri": uri, "env": dict(ENV)}
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
