"""The web page over real HTTP: who gets in, CSRF, HTTP Basic for scripts, /api/jobs, /metrics, logs.

A real node receives a phantom study from dcmtk's storescu (no computing: the job waits at READY),
and the web server runs on a free port as `mcnode serve` runs it. Requests are made as curl would.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread

from dicom_node.cli import main
from dicom_node.intake.jobrecord import JobData, JobState, PublicData
from dicom_node.web.server import WebServer
from dicom_node.web.users import UserStore
from tests.conftest import free_port, settings_for, storescu, wait_for
from tests.web_client import Client

PASSWORD = "correct horse battery"


@pytest.fixture
def web(config_dir, node_factory, phantom_dir):
    settings = settings_for(config_dir, web={"port": free_port()})
    UserStore.in_dir(settings.node.data_dir).add("alice", PASSWORD)
    node = node_factory(settings)
    assert storescu(node.port, sorted(phantom_dir.iterdir())).returncode == 0
    job = wait_for(lambda: node.journal.jobs_in(JobState.READY), timeout=30)[0]
    server = WebServer.for_node(node).start()
    try:
        yield node, server, job
    finally:
        server.stop()


def _cli(*argv: str, stdin: str = "") -> tuple[int, str]:
    out = io.StringIO()
    old = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out):
            code = main(list(argv))
    finally:
        sys.stdin = old
    return code, out.getvalue()


def test_user_add_list_remove_stores_only_an_argon2_hash(config_dir, capsys):
    cfg = str(config_dir / "mcnode.toml")
    assert _cli("user", "add", "bob", "-c", cfg, stdin="s3cret-enough-pw\n")[0] == 0
    users = config_dir / "data" / "web_users.json"
    assert os.stat(users).st_mode & 0o777 == 0o600
    text = users.read_text()
    assert "s3cret-enough-pw" not in text and "$argon2id$" in text
    store = UserStore(users)
    assert store.verify("bob", "s3cret-enough-pw") and not store.verify("bob", "s3cret-enough-px")
    # adding again is refused; --replace sets a new password
    assert _cli("user", "add", "bob", "-c", cfg, stdin="another-password\n")[0] != 0
    assert "exists" in capsys.readouterr().err
    assert _cli("user", "add", "bob", "-c", cfg, "--replace", stdin="another-password\n")[0] == 0
    assert UserStore(users).verify("bob", "another-password")
    assert _cli("user", "add", "carol", "-c", cfg, stdin="short\n")[0] != 0  # too short
    code, out = _cli("user", "list", "-c", cfg)
    assert code == 0 and "bob" in out and "carol" not in out
    assert _cli("user", "remove", "bob", "-c", cfg)[0] == 0
    assert UserStore(users).names() == []


def test_without_login_pages_redirect_and_apis_answer_401(web):
    _node, server, job = web
    anon = Client(server.url)
    page = anon.get(f"/jobs/{job.id}", headers={"Accept": "text/html"})
    assert page.status == 303 and page.headers["location"] == f"/login?next=/jobs/{job.id}"
    for path in ("/api/jobs", "/metrics", f"/jobs/{job.id}/rtdose", f"/jobs/{job.id}/dose.png"):
        reply = anon.get(path)
        assert reply.status == 401, path
        assert reply.headers["www-authenticate"].startswith("Basic")
    assert Client(server.url, basic=("alice", "wrong password!")).get("/api/jobs").status == 401
    assert Client(server.url, basic=("mallory", PASSWORD)).get("/api/jobs").status == 401
    assert anon.post(f"/jobs/{job.id}/cancel", {"csrf": "x"}).status == 401
    health = anon.get("/healthz")
    assert health.status == 200 and json.loads(health.body) == {"status": "ok"}
    bad = Client(server.url)
    assert bad.login("alice", "not the password").status == 401


def test_basic_auth_api_jobs_is_what_mcnode_jobs_json_prints(web, config_dir):
    _node, server, job = web
    reply = Client(server.url, basic=("alice", PASSWORD)).get("/api/jobs")
    assert reply.status == 200 and reply.headers["content-type"] == "application/json"
    code, printed = _cli("jobs", "-c", str(config_dir / "mcnode.toml"), "--json")
    assert code == 0
    assert json.loads(reply.body) == json.loads(printed)
    assert [r["id"] for r in json.loads(reply.body)] == [job.id]
    # the job waits at READY: its dose routes say there is no dose yet; an unknown job is not found
    client = Client(server.url, basic=("alice", PASSWORD))
    for route in ("rtdose", "dose.png"):
        missing = client.get(f"/jobs/{job.id}/{route}")
        assert (missing.status, missing.text) == (404, "this job has no RT Dose yet\n"), route
        unknown = client.get(f"/jobs/job-none/{route}")
        assert (unknown.status, unknown.text) == (404, "no such job\n"), route


def test_metrics_parse_as_prometheus_text(web):
    node, server, job = web
    # as the pipeline records it after shards failed and were retried on another worker
    node.journal.update_job_data(job.id, JobData(public=PublicData(shard_failures=3)))
    reply = Client(server.url, basic=("alice", PASSWORD)).get("/metrics")
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(reply.text) for s in fam.samples}
    assert samples[("mcnode_jobs", (("state", "READY"),))] == 1
    assert samples[("mcnode_jobs", (("state", "SENT"),))] == 0
    assert samples[("mcnode_queue_length", (("queue", "pipeline"),))] == 1
    assert samples[("mcnode_instances_received_total", (("kind", "CT"),))] == node.journal.count_instances() - 2
    assert samples[("mcnode_instances_received_total", (("kind", "RTIONPLAN"),))] == 1
    assert samples[("mcnode_shard_failures_total", ())] == 3
    spool = sum(p.stat().st_size for p in (node.settings.node.data_dir / "spool").rglob("*") if p.is_file())
    assert samples[("mcnode_data_dir_bytes", (("part", "spool"),))] == spool > 0
    assert samples[("mcnode_data_dir_bytes", (("part", "total"),))] > spool


def test_job_page_says_how_many_shards_a_retry_kept(web):
    node, server, job = web
    browser = Client(server.url)
    assert browser.login("alice", PASSWORD).status == 303
    assert "retry kept" not in browser.get(f"/jobs/{job.id}", headers={"Accept": "text/html"}).text
    # as the pipeline records it when a retried job re-attached to the shards its failed run finished
    node.journal.update_job_data(job.id, JobData(public=PublicData(
        retry={"reused_seal": True, "kept_shards": 62, "shards": 64})))
    page = browser.get(f"/jobs/{job.id}", headers={"Accept": "text/html"})
    assert page.status == 200 and "retry kept 62 of 64 shards" in page.text


def test_actions_need_the_csrf_token_and_are_logged_with_the_user_only(web, phantom_dir, caplog):
    node, server, job = web
    for name in ("dicom_node", "anonymizer", "uvicorn"):
        caplog.set_level(logging.INFO, logger=name)
    browser = Client(server.url)
    assert browser.login("alice", PASSWORD).status == 303
    page = browser.get(f"/jobs/{job.id}", headers={"Accept": "text/html"})
    assert page.status == 200
    plan = dcmread(phantom_dir / "RP.dcm")
    # the page shows who the job is (re-identified) ...
    assert str(plan.PatientID) in page.text and str(plan.RTPlanLabel) in page.text
    token = Client.csrf_in(page.text)
    # ... an action without the session's token is refused and changes nothing
    assert browser.post(f"/jobs/{job.id}/cancel", {"csrf": "forged"}).status == 403
    assert browser.post(f"/jobs/{job.id}/cancel", {}).status == 403
    assert node.journal.job(job.id).state == JobState.READY
    # Basic credentials sent by a browser on another site's behalf are refused too
    script = Client(server.url, basic=("alice", PASSWORD))
    assert script.post(f"/jobs/{job.id}/cancel", {}, headers={"Origin": "https://evil.example"}).status == 403
    assert node.journal.job(job.id).state == JobState.READY
    # with the token it happens
    done = browser.post(f"/jobs/{job.id}/cancel", {"csrf": token})
    assert done.status == 303 and done.headers["location"].startswith(f"/jobs/{job.id}?done=")
    assert node.journal.job(job.id).state == JobState.CANCELLED
    assert "cancelled by alice" in (node.journal.job(job.id).reason or "")
    # a script with Basic (no Origin, as curl) gets JSON; retrying a cancelled job is refused with the reason
    reply = script.post(f"/jobs/{job.id}/retry", {})
    assert reply.status == 409 and "only FAILED jobs" in json.loads(reply.body)["result"]
    # logs: the user and the job, never the patient
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"web: user alice cancelled job {job.id}" in logged
    for secret in (str(plan.PatientID), str(plan.PatientName).split("^")[0], str(plan.RTPlanLabel)):
        assert secret not in logged
    # logging out ends the session
    assert browser.post("/logout", {"csrf": token}).status == 303
    assert browser.get("/api/jobs").status == 401


def test_a_removed_user_is_locked_out_at_once(web, config_dir):
    _node, server, _job = web
    browser = Client(server.url)
    assert browser.login("alice", PASSWORD).status == 303
    assert browser.get("/api/jobs").status == 200
    UserStore(Path(config_dir / "data" / "web_users.json")).remove("alice")
    assert browser.get("/api/jobs").status == 401


def test_demo_prints_a_login_that_works_and_ends_without_a_terminal(tmp_path, capsys):
    import re
    import threading

    from dicom_node.demo import serve_page
    from dicom_node.settings import init_config_dir

    cfg = init_config_dir(tmp_path / "node", port=0)
    cfg.write_text(cfg.read_text().replace("port = 8484", f"port = {free_port()}"))
    # not a terminal (CI): the command and the login are printed, nothing keeps running
    password = serve_page(tmp_path, 1000, 1, hold=False)
    out = capsys.readouterr().out
    assert f"mcnode serve -c {cfg}" in out and f"user demo, password {password}" in out
    assert UserStore.in_dir(tmp_path / "node" / "data").verify("demo", password)
    # on a terminal the page is served until stopped, and the printed login opens it
    stop = threading.Event()
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(serve_page(tmp_path, 1000, 1, hold=True, stop=stop)))
    thread.start()
    try:
        line = wait_for(lambda: re.search(r"6\. web page: (http://\S+)  user demo  password (\S+)",
                                          capsys.readouterr().out), timeout=60)
        url, printed = line.group(1), line.group(2)  # type: ignore[union-attr]
        assert printed != password  # a new one each time
        browser = Client(url)
        assert browser.login("demo", printed).status == 303
        assert browser.get("/jobs", headers={"Accept": "text/html"}).status == 200
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive() and result


def test_https_with_the_nodes_certificate_and_secure_cookies(config_dir, node_factory, tmp_path):
    import ssl
    import urllib.error
    import urllib.request

    from tests.test_tls import _key_and_cert

    ca_key, ca_cert, _ca_key_path, ca_path = _key_and_cert("ca", None, True, tmp_path)
    _k, _c, server_key, server_crt = _key_and_cert("node", (ca_key, ca_cert), False, tmp_path)
    settings = settings_for(config_dir, node={"tls": {"cert_file": str(server_crt), "key_file": str(server_key)}},
                            web={"port": free_port()})
    UserStore.in_dir(settings.node.data_dir).add("alice", PASSWORD)
    node = node_factory(settings)
    with WebServer.for_node(node) as server:
        assert server.url.startswith("https://127.0.0.1:")
        browser = Client(server.url, cafile=str(ca_path))
        login = browser.login("alice", PASSWORD)
        assert login.status == 303
        cookie = next(c for c in browser.cookies if c.name == "mcnode_session")
        assert cookie.secure
        assert "httponly" in login.headers["set-cookie"].lower() and "samesite=strict" in login.headers[
            "set-cookie"].lower()
        assert browser.get("/api/jobs").status == 200
        assert Client(server.url, basic=("alice", PASSWORD), cafile=str(ca_path)).get("/api/jobs").status == 200
        # a client that does not trust the node's CA does not get through; plain HTTP is not answered
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(server.url + "healthz", timeout=10, context=ssl.create_default_context())
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(server.url.replace("https", "http") + "healthz", timeout=10)


def test_jobs_rows_filter_by_state_and_creation_day(web):
    from datetime import UTC, datetime, timedelta

    _node, server, job = web
    client = Client(server.url, basic=("alice", PASSWORD))
    today = datetime.now(UTC).date()
    tomorrow, yesterday = today + timedelta(days=1), today - timedelta(days=1)

    def shown(query: str) -> bool:
        reply = client.get(f"/jobs/rows?{query}")
        assert reply.status == 200
        return f'data-job="{job.id}"' in reply.text

    assert shown("") and shown("state=READY") and not shown("state=SENT")
    assert shown(f"from={yesterday}&to={today}") and shown(f"from={today}")
    assert not shown(f"from={tomorrow}") and not shown(f"to={yesterday}")
    page = client.get("/jobs?state=SENT", headers={"Accept": "text/html"})
    assert page.status == 200 and "No jobs match the filter" in page.text and job.id not in page.text
