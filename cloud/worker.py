"""The worker: one shard of one job, wherever it runs (local process, ssh host, AWS Batch child).

    python -m cloud.worker --job J --bundle URI --shard I --primaries N --seed S --result URI

(also `mcnode worker`). The job's data key arrives on standard input as one hex line (ssh, local)
or, for AWS, KMS-wrapped next to the bundle (``--key-uri``). The worker fetches the sealed bundle,
opens it in its own temporary folder, runs the engine, seals the tally (part ``shard-I``) and stores
it. The key and the clear bundle never touch disk outside that folder, which is removed; on the local
backend (``--shared-dir``) the bundle, a file on the node, is opened once per job in the node's own
private work folder instead, and the backend removes it when the job's last wave ends.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import hmac
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from anonymizer.errors import AnonymizerError
from anonymizer.seal import open_bytes, seal_bytes
from cloud.bundle import MANIFEST, open_bundle
from cloud.errors import CloudError
from cloud.stores.base import store_for

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardTask:
    job_id: str
    index: int
    primaries: int
    seed: int
    bundle_uri: str
    result_uri: str
    threads: int = 0

    def argv(self, key_uri: str | None = None) -> list[str]:
        """The worker's arguments for this task (see `build_parser`); no secrets on it.

        The one builder of the worker command line: local, ssh and aws append it to their command.
        With `key_uri` the worker reads the KMS-wrapped key there instead of on standard input.
        """
        return ["--job", self.job_id, "--bundle", self.bundle_uri, "--shard", str(self.index),
                "--primaries", str(self.primaries), "--seed", str(self.seed), "--result", self.result_uri,
                "--threads", str(self.threads), *(["--key-uri", key_uri] if key_uri else [])]

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def result_part(index: int) -> str:
    return f"shard-{index}"


def _opened_once(sealed: Path, key: bytes, job_id: str, shared: Path) -> Path:
    """The bundle opened in ``shared`` by the first shard of the job on this machine, reused by the next.

    The local backend's shards all read the node's own sealed bundle: opening it (decrypt, unpack, hash
    93 MB for a 512x512x177 CT) once per job instead of once per shard saves ~0.45 s a shard. The folder
    is the backend's (under the node's private work folder, removed when the job's last wave ends); its
    ``opened`` mark is an HMAC under the job key of the sealed file's identity, so a bundle sealed again
    (a retry seals afresh, with a new key) or replaced is opened again, never taken for the old one.
    """
    shared.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = sealed.stat()
    mark = hmac.new(key, f"{job_id}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode(),
                    hashlib.sha256).hexdigest()
    folder, marker = shared / "bundle", shared / "opened"
    with (shared / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # side-by-side shards: one opens, the others wait for it
        if marker.is_file() and hmac.compare_digest(marker.read_text().strip(), mark):
            return folder
        marker.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        open_bundle(sealed, key, job_id, folder)
        marker.write_text(mark)  # last: a worker killed while opening leaves no mark
    return folder


def run_task(task: ShardTask, key: bytes, work_dir: Path | None = None, shared_dir: Path | None = None) -> float:
    """Run one shard end to end; return the engine's wall seconds.

    The opened bundle lives in a temporary folder under `work_dir` (the system's temporary folder
    when None), removed when the shard ends; a worker killed outright cannot remove it, so the
    local backend gives each worker a folder of its own and removes that after the process ends.
    With `shared_dir` (the local backend, the bundle a file on this machine) the bundle is opened
    there once for all the job's shards (`_opened_once`) and left for the backend to remove.
    """
    from cloud.engines import get_engine  # engines pull in numpy etc.; keep `--help` fast
    from cloud.engines.base import ShardInputs

    if work_dir is not None:
        work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"mcnode-{task.job_id}-{task.index}-", dir=work_dir) as tmp:
        work = Path(tmp)
        store = store_for(task.bundle_uri)
        sealed = store.local_path(task.bundle_uri)  # a file here is read in place, not copied first
        if sealed is not None and shared_dir is not None:
            opened = _opened_once(sealed, key, task.job_id, shared_dir)
            manifest = json.loads((opened / MANIFEST).read_text())
        else:
            if sealed is None:
                sealed = work / "bundle.sealed"
                store.get_file(task.bundle_uri, sealed)
            opened = work / "bundle"
            manifest = open_bundle(sealed, key, task.job_id, opened)
            if sealed.parent == work:
                sealed.unlink()
        engine = get_engine(manifest["engine"])
        tally = engine.run_shard(ShardInputs.load(opened / "inputs"), task.primaries, task.seed, task.threads)
        store_for(task.result_uri).put_bytes(seal_bytes(tally.to_bytes(), key, task.job_id,
                                                        result_part(task.index)), task.result_uri)
        return float(tally.wall_s)


def load_result(task: ShardTask, key: bytes) -> bytes:
    """The opened (verified) tally bytes of a finished shard."""
    return open_bytes(store_for(task.result_uri).get_bytes(task.result_uri), key, task.job_id,
                      result_part(task.index))


def _read_key(args: argparse.Namespace) -> bytes:
    if args.key_uri:
        from cloud.kms import unwrap_data_key  # boto3 only for AWS

        return unwrap_data_key(args.key_uri, args.job)
    line = sys.stdin.readline().strip()
    try:
        key = bytes.fromhex(line)
    except ValueError as exc:
        raise CloudError("the data key on standard input is not hex") from exc
    if len(key) != 32:
        raise CloudError("no 32-byte data key on standard input")
    return key


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="mcnode worker", description="run one shard of a job")
    p.add_argument("--job", required=True)
    p.add_argument("--bundle", required=True, help="URI of the sealed bundle")
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--primaries", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--result", required=True, help="URI to store the sealed tally at")
    p.add_argument("--threads", type=int, default=0, help="engine threads; 0 = all cores")
    p.add_argument("--key-uri", default=None, help="KMS-wrapped data key (AWS); default: hex on stdin")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="folder for the opened bundle (default: the system's temporary folder)")
    p.add_argument("--shared-dir", type=Path, default=None,
                   help="open a bundle that is a local file here once for all the job's shards (local backend)")
    return p


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    # a backend stopping a shard (deadline, cancel) sends SIGTERM: unwind so the temporary folder
    # holding the opened bundle is removed
    raise SystemExit(128 + signum)


def run_from_args(args: argparse.Namespace) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    index = int(os.environ.get("AWS_BATCH_JOB_ARRAY_INDEX", "-1"))
    shard = args.shard if index < 0 else args.shard + index
    result = args.result.replace("{shard}", str(shard))
    task = ShardTask(args.job, shard, args.primaries, args.seed + (shard - args.shard), args.bundle, result,
                     args.threads)
    start = time.perf_counter()
    wall = run_task(task, _read_key(args), args.work_dir, args.shared_dir)
    LOGGER.info("job %s shard %d: %d primaries in %.1f s (engine %.1f s)", task.job_id, shard, task.primaries,
                time.perf_counter() - start, wall)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s worker: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return run_from_args(args)
    except (CloudError, AnonymizerError) as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
