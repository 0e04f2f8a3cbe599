"""Shared fixtures: real peers (dcmtk), a node on a free port, phantom studies.

dcmtk programs are run with TCP_NODELAY=1: without it, dcmtk's small PDUs meet the kernel's
delayed ACKs and every C-STORE costs ~40-80 ms on loopback, which only slows the tests down.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dicom_node.jobs.node import Node
from dicom_node.phantom import PhantomSpec, Study, build_study, write_study
from dicom_node.settings import Settings, init_config_dir, load_settings, settings_from_dict
from tests.peers import stop_process

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}

# A small phantom keeps the tests quick: 24 slices of 40x40 at 5 mm.
SMALL = PhantomSpec(size_mm=(200.0, 200.0, 120.0), spacing_mm=(5.0, 5.0, 5.0),
                    water_box_mm=(160.0, 160.0, 100.0), target_radius_mm=20.0, energy_layers=3)


def wait_for(predicate: Callable[[], object], timeout: float = 15.0, interval: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_dcmtk(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    exe = shutil.which(args[0])
    assert exe, f"{args[0]} not found: run 'make test' (it installs dcmtk) or apt-get install dcmtk"
    return subprocess.run([exe, *args[1:]], capture_output=True, text=True, timeout=timeout, env=DCMTK_ENV)


def storescu(port: int, files: list[Path] | list[str], aet: str = "TPS", aec: str = "MCNODE",
             *extra: str) -> subprocess.CompletedProcess[str]:
    return run_dcmtk("storescu", "-R", "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(port),
                     *[str(f) for f in files])


@pytest.fixture
def phantom_dir(tmp_path: Path) -> Path:
    out = tmp_path / "study"
    write_study(build_study(SMALL), out)
    return out


@pytest.fixture
def make_study() -> Callable[..., Study]:
    def factory(**changes: object) -> Study:
        from dataclasses import replace

        return build_study(replace(SMALL, **changes))  # type: ignore[arg-type]

    return factory


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "node"
    path = init_config_dir(directory, port=0)
    text = path.read_text().replace("stable_seconds = 10", "stable_seconds = 1")
    # The phantom's machine, mapped explicitly to the uncommissioned generic beam model.
    text = text.replace("beam_models = {}", f'beam_models = {{"{SMALL.machine_name}" = "generic"}}')
    assert "generic" in text
    text = text.replace('allowed_callers = ["TPS"]', 'allowed_callers = ["TPS", "TPS2"]')
    # No web page unless a test asks for one. Written "+0" (TOML's zero too) so that tests replacing
    # "port = 0" -- the DICOM port -- with a fixed port leave this one alone.
    text = text.replace("port = 8484", "port = +0")
    path.write_text(text)
    return directory


def settings_for(config_dir: Path, **overrides: object) -> Settings:
    """The test config with some keys changed, per section: settings_for(d, trigger={...})."""
    import tomllib

    table = tomllib.loads((config_dir / "mcnode.toml").read_text())
    for section, values in overrides.items():
        if isinstance(values, list):
            table[section] = values
        else:
            table.setdefault(section, {}).update(values)
    return settings_from_dict(table, config_dir)


@pytest.fixture
def node_factory(config_dir: Path) -> Iterator[Callable[..., Node]]:
    """Start nodes on free ports; every node started is stopped at the end."""
    started: list[Node] = []

    def start(settings: Settings | None = None, compute: bool = False, **kwargs: object) -> Node:
        node = Node(settings or load_settings(config_dir / "mcnode.toml"), compute=compute,
                    **kwargs)  # type: ignore[arg-type]
        node.start()
        started.append(node)
        return node

    yield start
    for node in started:
        if node.port is not None and node._server is not None:
            node.stop()


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., tuple[int, Path]]]:
    """dcmtk's storescp as a TPS that receives RT Doses; returns (port, folder)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(aet: str = "TPS", port: int | None = None) -> tuple[int, Path]:
        port = port or free_port()
        out = tmp_path / f"tps-{port}"
        out.mkdir(exist_ok=True)
        exe = shutil.which("storescp")
        assert exe, "storescp not found: run 'make test' (it installs dcmtk)"
        proc = subprocess.Popen([exe, "-aet", aet, "-od", str(out), "+xa", str(port)], env=DCMTK_ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        wait_for(lambda: run_dcmtk("echoscu", "-aec", aet, "127.0.0.1", str(port), timeout=10).returncode == 0)
        return port, out

    yield start
    for proc in procs:
        stop_process(proc)


def seal_a_job(config_dir, node_factory, phantom_dir, tps_port: int = 11113, **sections):
    """Receive the phantom study, then drive the pipeline to SEALED: (settings, node, pipeline, job)."""
    from dicom_node.intake.jobrecord import JobState
    from dicom_node.jobs.pipeline import Pipeline

    settings = settings_for(config_dir, engine={"primaries": 4000}, cloud={"shards": 2},
                            destinations=[{"calling_ae_title": "TPS", "ae_title": "TPS", "host": "127.0.0.1",
                                           "port": tps_port}], **sections)
    node = node_factory(settings)  # receives only; the test drives the pipeline
    assert storescu(node.port, sorted(phantom_dir.iterdir())).returncode == 0
    job = wait_for(lambda: node.journal.jobs_in(JobState.READY))[0]
    pipeline = Pipeline(settings, node.journal)
    assert pipeline.process(job.id, until=JobState.SEALED).state == JobState.SEALED
    return settings, node, pipeline, job
