"""Real network peers for the tests and the benchmarks: OpenSSH's sshd, moto_server and Orthanc.

They listen on 127.0.0.1 only, on free ports, with everything (host key, client key, config) in a
temporary folder; the context managers stop the process they started and wait for it. Orthanc binds
every interface and has no listen-address option, so it runs only inside `loopback_network()`: a
network namespace of its own that has nothing but loopback. Imports nothing from dicom_node, so
these tests run without the node's conftest chain.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
FAKE_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class Sshd:
    port: int
    user: str
    client_key: Path
    known_hosts: Path  # holds this sshd's host key under [127.0.0.1]:port
    folder: Path


@contextmanager
def sshd(folder: Path) -> Iterator[Sshd]:
    """A real sshd on 127.0.0.1 accepting our generated client key for the current user."""
    if not Path(SSHD).exists():
        raise RuntimeError("sshd not found: run 'make system-deps' (apt-get install openssh-server)")
    folder.mkdir(parents=True, exist_ok=True)
    host_key, client_key = folder / "host_ed25519", folder / "client_ed25519"
    for key in (host_key, client_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (folder / "authorized_keys").write_text((folder / "client_ed25519.pub").read_text())
    port = free_port()
    user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name
    config = folder / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}", f"PidFile {folder / 'sshd.pid'}",
        f"AuthorizedKeysFile {folder / 'authorized_keys'}", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PubkeyAuthentication yes", "PermitRootLogin prohibit-password",
        "StrictModes no", "UsePAM no", "Subsystem sftp internal-sftp", "MaxStartups 512",
        "MaxSessions 100", "LogLevel ERROR", "UseDNS no",
        # A clean worker host: bash skips ~/.bashrc when SHLVL says it is nested. Here root's .bashrc
        # runs `pyenv init`, 0.35 s of CPU per command, which is this machine's, not the backend's cost.
        "SetEnv SHLVL=2", ""]))
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    host_pub = (folder / "host_ed25519.pub").read_text().split()
    known = folder / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    log = open(folder / "sshd.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=log)
    try:
        _wait_port(port, proc)
        yield Sshd(port, user, client_key, known, folder)
    finally:
        stop_process(proc)
        log.close()


@contextmanager
def moto_server(folder: Path) -> Iterator[str]:
    """moto_server on 127.0.0.1 with Batch in its no-docker mode; yields the endpoint URL."""
    exe = Path(sys.executable).with_name("moto_server")
    port = free_port()
    env = {**os.environ, **FAKE_AWS_ENV}
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / "moto.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        _wait_port(port, proc, timeout=60)
        url = f"http://127.0.0.1:{port}"
        req = urllib.request.Request(f"{url}/moto-api/config", method="POST",
                                     data=json.dumps({"batch": {"use_docker": False}}).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).close()
        yield url
    finally:
        stop_process(proc)
        log.close()


def moto_batch(url: str, bucket: str = "mcnode-test", queue: str = "mcnode-q",
               definition: str = "mcnode") -> str:
    """A bucket, a KMS key, a Batch compute environment, job queue and job definition on moto at `url`.

    Needs the fake credentials of FAKE_AWS_ENV in the environment; returns the KMS key id.
    """
    import boto3

    boto3.client("s3", endpoint_url=url).create_bucket(Bucket=bucket)
    key_id = str(boto3.client("kms", endpoint_url=url).create_key()["KeyMetadata"]["KeyId"])
    iam = boto3.client("iam", endpoint_url=url)
    role = iam.create_role(RoleName="batch", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    profile = iam.create_instance_profile(InstanceProfileName="batch")["InstanceProfile"]["Arn"]
    ec2 = boto3.client("ec2", endpoint_url=url)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.0.0/24")["Subnet"]["SubnetId"]
    sg = ec2.create_security_group(GroupName="mcnode", Description="workers", VpcId=vpc)["GroupId"]
    batch = boto3.client("batch", endpoint_url=url)
    env = batch.create_compute_environment(
        computeEnvironmentName="mcnode-ce", type="MANAGED", state="ENABLED", serviceRole=role,
        computeResources={"type": "EC2", "minvCpus": 0, "maxvCpus": 4, "desiredvCpus": 0,
                          "instanceTypes": ["optimal"], "subnets": [subnet],
                          "securityGroupIds": [sg], "instanceRole": profile})["computeEnvironmentArn"]
    batch.create_job_queue(jobQueueName=queue, state="ENABLED", priority=1,
                           computeEnvironmentOrder=[{"order": 1, "computeEnvironment": env}])
    batch.register_job_definition(jobDefinitionName=definition, type="container",
                                  containerProperties={"image": "mcnode", "vcpus": 1, "memory": 512})
    return key_id


@contextmanager
def moto_aws(folder: Path) -> Iterator[tuple[str, str]]:
    """moto_server with ``moto_batch``'s bucket, KMS key and Batch queue, its URL as AWS_ENDPOINT_URL and
    the fake credentials in the environment until the block ends; yields (endpoint URL, KMS key id)."""
    names = [*FAKE_AWS_ENV, "AWS_ENDPOINT_URL"]
    saved = {k: os.environ.get(k) for k in names}
    with moto_server(folder) as url:
        os.environ.update({**FAKE_AWS_ENV, "AWS_ENDPOINT_URL": url})
        try:
            yield url, moto_batch(url)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _loopback_up() -> None:
    """`ip link set lo up` without needing iproute2: SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP."""
    get_flags, set_flags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, get_flags, request))[1]
        fcntl.ioctl(s, set_flags, struct.pack("16sH22x", b"lo", flags | iff_up))


@contextmanager
def loopback_network() -> Iterator[None]:
    """Put the calling thread in a new network namespace that has only loopback (root only).

    Every socket it opens, and every thread and process it starts from then on, is in that
    namespace: servers that bind 0.0.0.0 there are reachable from nowhere else. On leaving, the
    thread returns to its own network; what it started stays where it was started.
    """
    if os.geteuid() != 0:
        raise RuntimeError("a network namespace of its own needs root (make test runs as root)")
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        os.unshare(os.CLONE_NEWNET)
        _loopback_up()
        yield
    finally:
        os.setns(original, os.CLONE_NEWNET)
        os.close(original)


def orthanc_config(folder: Path, dicom_port: int, http_port: int, aet: str = "ORTHANC",
                   modalities: dict[str, list[object]] | None = None) -> Path:
    """A configuration file for Orthanc with its storage and index under folder; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "test", "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "index"),
        "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": aet, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True, "StorageCompression": False, "SyncStorageArea": True, "Plugins": [],
        "ConcurrentJobs": 1, "DicomModalities": modalities or {},
    }
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config))
    return path


@dataclass(frozen=True)
class Orthanc:
    dicom_port: int
    aet: str
    url: str  # its REST API, http://127.0.0.1:PORT

    def get(self, path: str) -> Any:
        return json.loads(self.text(path))

    def text(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.read().decode()

    def post(self, path: str, body: bytes | object, content_type: str = "application/json") -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST",
                                     headers={"Content-Type": content_type})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())


@contextmanager
def orthanc(folder: Path, aet: str = "ORTHANC", modalities: dict[str, list[object]] | None = None) -> Iterator[Orthanc]:
    """A real Orthanc (Debian's package, not its service); call it inside loopback_network()."""
    if not Path(ORTHANC).exists():
        raise RuntimeError("Orthanc not found: run 'make system-deps' (apt-get install orthanc)")
    dicom_port, http_port = free_port(), free_port()
    config = orthanc_config(folder, dicom_port, http_port, aet, modalities)
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([ORTHANC, str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_port(http_port, proc, timeout=60)
        _wait_port(dicom_port, proc, timeout=60)
        yield Orthanc(dicom_port, aet, f"http://127.0.0.1:{http_port}")
    finally:
        stop_process(proc)
        log.close()
