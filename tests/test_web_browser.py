"""The web page in a real browser: headless Chromium (Debian's, driven by Selenium through chromedriver).

Two jobs go the real way (storescu → node → MCsquare shards, few primaries → storescp):
- B: arrives at a node that only receives (its plan passes the arrival check); then its machine's
  beam model file is overwritten with garbage, and the computing node that takes B up fails it
  (FAILED in READY). The physicist restores the file and presses Retry; B runs, its dose is delivered.
- A: on the phantom machine (the generic, uncommissioned beam model: a warning); once its dose is
  delivered the TPS sends that dose back as its own, so A ends VERIFIED (pass) with a report.
The browser logs in, reads the jobs table, opens A (dose picture, verdict), retries B. Screenshots
are saved in the test's tmp folder (`web-*.png`) to be looked at.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import shutil
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from cloud.engines.mcsquare.adapter import generic_beam_model_path
from dicom_node.intake.jobrecord import JobState
from dicom_node.phantom import FakeIdentity, build_study, write_study
from dicom_node.web.server import WebServer
from dicom_node.web.users import UserStore
from tests.conftest import SMALL, free_port, settings_for, storescu, wait_for
from tests.web_client import Client

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
PASSWORD = "physics-is-fun-42"
SECOND = FakeIdentity(patient_name="Ferreira^Joao", patient_id="PAT-7730015")


def _browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(), \
        "chromium and chromium-driver are needed: run 'make test' (it installs them) or apt-get install them"
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


def test_physicist_logs_in_sees_a_verified_dose_and_retries_a_failed_job(config_dir, node_factory, storescp,
                                                                          tmp_path, caplog):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    for name in ("dicom_node", "anonymizer", "cloud", "uvicorn"):  # pymedphys logs at INFO on the root logger
        caplog.set_level(logging.INFO, logger=name)
    tps_port, tps_dir = storescp(aet="TPS")
    bdl = tmp_path / "gantry2_bdl.txt"
    shutil.copy(generic_beam_model_path(), bdl)
    settings = settings_for(
        config_dir, engine={"primaries": 20_000,
                            "beam_models": {SMALL.machine_name: "generic", "GANTRY_2": str(bdl)}},
        cloud={"shards": 2}, outbox={"retry_initial_seconds": 0.5, "retry_max_seconds": 2},
        web={"port": free_port(), "refresh_seconds": 1},
        secondcheck={"max_mc_uncertainty_percent": 50.0},  # 20 000 primaries: far noisier than the default 2 %
        destinations=[{"calling_ae_title": "TPS", "ae_title": "TPS", "host": "127.0.0.1", "port": tps_port}])
    UserStore.in_dir(settings.node.data_dir).add("physicist", PASSWORD)
    receiving = node_factory(settings, compute=False)
    study_b = build_study(dataclasses.replace(SMALL, machine_name="GANTRY_2", plan_label="HEAD_MC",
                                              identity=SECOND))
    write_study(study_b, tmp_path / "b")
    assert storescu(receiving.port, sorted((tmp_path / "b").iterdir())).returncode == 0
    (job_b,) = wait_for(lambda: receiving.journal.jobs_in(JobState.READY), timeout=60)
    receiving.stop()
    bdl.write_text("this is not a beam model\n")
    node = node_factory(settings, compute=True)
    job_b = wait_for(lambda: node.journal.jobs_in(JobState.FAILED), timeout=120)[0]
    assert node.journal.job(job_b.id).data.failed_in == JobState.READY
    web = WebServer.for_node(node).start()
    driver = None
    try:
        # A: plan, CT, structures -> SENT
        study_a = build_study(SMALL)
        write_study(study_a, tmp_path / "a")
        assert storescu(node.port, sorted((tmp_path / "a").iterdir())).returncode == 0
        job_a = wait_for(lambda: node.journal.jobs_in(JobState.SENT), timeout=300)[0]
        # the TPS sends its own dose for A's plan (here: the MC dose it received, as a new instance)
        (mc_file,) = wait_for(lambda: [p for p in tps_dir.iterdir() if p.name.startswith("RD")])
        tps_dose = dcmread(mc_file)
        tps_dose.SOPInstanceUID = tps_dose.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        tps_dose.Manufacturer = "FakeTPS"
        tps_dose.save_as(tmp_path / "RD_TPS.dcm", enforce_file_format=True)
        assert storescu(node.port, [tmp_path / "RD_TPS.dcm"]).returncode == 0
        wait_for(lambda: node.journal.job(job_a.id).state == JobState.VERIFIED, timeout=120)
        verdict = node.journal.job(job_a.id).data.public.verdict
        assert verdict == "pass"

        driver = _browser(tmp_path / "chromium-profile")
        wait = WebDriverWait(driver, 60)
        driver.get(web.url + "jobs")
        assert "/login" in driver.current_url  # not logged in: the login form
        driver.find_element(By.ID, "username").send_keys("physicist")
        driver.find_element(By.ID, "password").send_keys("wrong password")
        driver.find_element(By.ID, "login").click()
        assert "wrong user name or password" in wait.until(
            ec.presence_of_element_located((By.ID, "login-error"))).text
        driver.find_element(By.ID, "username").clear()
        driver.find_element(By.ID, "username").send_keys("physicist")
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        driver.find_element(By.ID, "login").click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, f"tr[data-job='{job_a.id}']")))
        table = driver.find_element(By.ID, "rows").text
        assert "PAT-4471920" in table and "PAT-7730015" in table and "HEAD_MC" in table  # re-identified
        row_a = driver.find_element(By.CSS_SELECTOR, f"tr[data-job='{job_a.id}']").text
        assert "VERIFIED" in row_a and verdict.upper() in row_a and "3%/2mm" in row_a and "compute + merge" in row_a
        assert "shards 2/2" in row_a and "uncertainty" in row_a
        assert "FAILED" in driver.find_element(By.CSS_SELECTOR, f"tr[data-job='{job_b.id}']").text
        # the rows refresh without a reload: the "updated" clock changes
        first = driver.find_element(By.ID, "updated").text
        wait.until(lambda d: d.find_element(By.ID, "updated").text != first)
        driver.save_screenshot(str(tmp_path / "web-jobs.png"))

        # A finished job: the dose over the CT and the verdict
        driver.find_element(By.CSS_SELECTOR, f"tr[data-job='{job_a.id}'] a.job-link").click()
        picture = wait.until(ec.presence_of_element_located((By.ID, "dose-picture")))
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", picture))
        assert driver.execute_script("return arguments[0].naturalWidth", picture) >= 1000
        head = driver.find_element(By.CSS_SELECTOR, ".jobhead").text
        assert f"Job {job_a.id}" in head and "VERIFIED" in head and verdict.upper() in head
        assert "PAT-4471920" in head and SMALL.plan_label in head
        assert driver.find_element(By.ID, "report-pdf").get_attribute("href").endswith(f"/jobs/{job_a.id}/report.pdf")
        transitions = driver.find_element(By.ID, "transitions").text
        for state in ("RECEIVING", "READY", "SEALED", "RUNNING", "MERGED", "SENT", "VERIFIED"):
            assert state in transitions
        assert "UNCOMMISSIONED" in driver.find_element(By.CSS_SELECTOR, ".warnings").text  # the generic model
        driver.save_screenshot(str(tmp_path / "web-job-verified.png"))
        frame = driver.find_element(By.CSS_SELECTOR, "iframe.report")  # the second-check report, embedded
        driver.execute_script("arguments[0].scrollIntoView()", frame)
        driver.switch_to.frame(frame)
        assert "PASS" in driver.find_element(By.TAG_NAME, "body").text.upper()
        driver.switch_to.default_content()
        driver.save_screenshot(str(tmp_path / "web-job-report.png"))
        png = node.settings.node.data_dir / "jobs" / job_a.id / "web" / "dose.png"
        shutil.copy(png, tmp_path / "web-dose.png")
        # send A's dose to the TPS once more (it lost it): the outbox delivers it again
        driver.find_element(By.ID, "resend").click()
        assert "queued" in wait.until(ec.presence_of_element_located((By.ID, "message"))).text
        wait_for(lambda: node.journal.job(job_a.id).data.public.resent == 1, timeout=60)
        assert node.journal.job(job_a.id).state == JobState.VERIFIED
        # the RT Dose download (as a script would fetch it) is the re-identified dose the TPS got
        download = Client(web.url, basic=("physicist", PASSWORD)).get(f"/jobs/{job_a.id}/rtdose")
        assert download.status == 200 and f"RD_{job_a.id}.dcm" in download.headers["content-disposition"]
        rd = dcmread(io.BytesIO(download.body))
        assert rd.PatientID == "PAT-4471920" and rd.SOPInstanceUID == dcmread(mc_file).SOPInstanceUID

        # B: fix the beam model, press Retry, see the state change
        shutil.copy(generic_beam_model_path(), bdl)
        driver.get(web.url + f"jobs/{job_b.id}")
        assert "FAILED" in driver.find_element(By.ID, "state").text
        assert "PAT-7730015" in driver.find_element(By.ID, "patient-id").text
        driver.find_element(By.ID, "retry").click()
        wait.until(ec.presence_of_element_located((By.ID, "message")))
        assert "retried" in driver.find_element(By.ID, "message").text
        assert driver.find_element(By.ID, "state").text != "FAILED"
        driver.save_screenshot(str(tmp_path / "web-job-retried.png"))
        # the job really runs now; the page follows it (it reloads when the state changes)
        wait_for(lambda: node.journal.job(job_b.id).state == JobState.SENT, timeout=300)
        # (the element found may be replaced by the reload before its text is read: look again)
        WebDriverWait(driver, 30, ignored_exceptions=(StaleElementReferenceException,)).until(
            lambda d: d.find_element(By.ID, "state").text == "SENT")
        assert not driver.find_elements(By.ID, "message")  # the retry message went with the old state
        assert driver.find_element(By.ID, "dose-picture")
        driver.save_screenshot(str(tmp_path / "web-job-sent.png"))
        time.sleep(0.2)
    finally:
        if driver is not None:
            driver.quit()
        web.stop()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"web: user physicist retried job {job_b.id}" in logged
    assert f"web: user physicist downloaded the RT Dose of job {job_a.id}" in logged
    for secret in ("PAT-4471920", "PAT-7730015", "Lindqvist", "Ferreira", SMALL.plan_label, "HEAD_MC",
                   str(dcmread(tmp_path / "a" / "RP.dcm").SOPInstanceUID)):
        assert secret not in logged


def _workers_of(job_id: str) -> list[int]:
    """Process ids of the local backend's shard workers for this job (their command line names it)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"cloud.worker" in cmd and job_id.encode() in cmd:
            found.append(int(proc.name))
    return found


def test_cancel_from_the_page_stops_the_running_shards(config_dir, node_factory, storescp, phantom_dir):
    """A job cancelled while its shards run: they are stopped, nothing is merged or sent."""
    tps_port, tps_dir = storescp(aet="TPS")
    settings = settings_for(
        config_dir, engine={"primaries": 20_000_000}, cloud={"shards": 2}, web={"port": free_port()},
        destinations=[{"calling_ae_title": "TPS", "ae_title": "TPS", "host": "127.0.0.1", "port": tps_port}])
    UserStore.in_dir(settings.node.data_dir).add("physicist", PASSWORD)
    node = node_factory(settings, compute=True)
    with WebServer.for_node(node) as web:
        assert storescu(node.port, sorted(phantom_dir.iterdir())).returncode == 0
        (job,) = wait_for(lambda: node.journal.jobs_in(JobState.RUNNING), timeout=120)
        wait_for(lambda: node.journal.job(job.id).shards_total == 2, timeout=60)  # the shards have started
        script = Client(web.url, basic=("physicist", PASSWORD))
        assert wait_for(lambda: _workers_of(job.id), timeout=60)  # shard workers are running
        reply = script.post(f"/jobs/{job.id}/cancel", {})
        assert reply.status == 200 and json.loads(reply.body)["result"] == "cancelled"
        assert node.pipeline is not None and node.pipeline.wait_idle(timeout=120)
        # 20 M primaries take minutes here: the pipeline is idle because the shard workers were stopped
        assert not _workers_of(job.id)
        time.sleep(1)
        states = [s for s, _r, _t in node.journal.history(job.id)]
        assert states[-1] == JobState.CANCELLED and JobState.MERGED not in states
        assert not [p for p in tps_dir.iterdir() if p.name.startswith("RD")]
        # a cancelled job cannot be retried or cancelled again
        assert script.post(f"/jobs/{job.id}/retry", {}).status == 409
        assert script.post(f"/jobs/{job.id}/cancel", {}).status == 409
