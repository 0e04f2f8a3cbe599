"""`mcnode anonymize`: writes only de-identified files, --what-if lists actions, no PHI in output."""

from __future__ import annotations

import logging
import secrets
import warnings

import pydicom
import pytest

from dicom_node.cli import main
from dicom_node.phantom import write_study
from dicom_node.settings import init_config_dir
from tests.anon_data import IDENTITY, leaks, planted_study


@pytest.fixture
def study_dir(tmp_path):
    directory = tmp_path / "in" / f"{IDENTITY.patient_id}_Lindqvist"  # PHI in the path, as users do
    write_study(planted_study(), directory)
    (directory / "notes.txt").write_text("not DICOM")
    return directory


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "site.key"
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)
    return path


def test_anonymize_writes_only_deidentified_files(study_dir, key_file, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    caplog.set_level(logging.DEBUG)
    assert main(["anonymize", str(study_dir), "-o", str(out), "--key-file", str(key_file)]) == 0
    written = sorted(out.iterdir())
    assert len(written) == len(list(study_dir.glob("*.dcm")))
    for path in written:
        assert leaks(path.name.encode()) == []
        assert leaks(path.read_bytes()) == []
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES"
        assert path.name.endswith(f"_{ds.SOPInstanceUID}.dcm")
    stdout, stderr = capsys.readouterr()
    assert leaks((stdout + stderr + caplog.text).encode()) == []
    assert f"wrote {len(written)}" in stdout


def test_what_if_lists_actions_and_writes_nothing(study_dir, key_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["anonymize", str(study_dir), "-o", str(out), "--what-if", "--key-file", str(key_file)]) == 0
    assert not out.exists()
    stdout, stderr = capsys.readouterr()
    lines = stdout.splitlines()
    assert any(line.startswith("(0010,0010)") and " PatientName " in line and " D " in line for line in lines)
    assert any(line.startswith("(0010,1000)") and " OtherPatientIDs " in line and " X " in line
               for line in lines)
    assert any(line.startswith("(300A,03A2)>(300A,03A8)>(300A,0394)") and " K " in line for line in lines)
    assert any(" private " in line and " X " in line for line in lines)
    assert any(" StudyDate " in line and " S " in line for line in lines)
    assert leaks((stdout + stderr).encode()) == []


def test_site_key_from_config(study_dir, tmp_path):
    config = init_config_dir(tmp_path / "cfg")
    out = tmp_path / "out"
    assert main(["anonymize", str(study_dir), "-o", str(out), "-c", str(config)]) == 0
    assert len(list(out.glob("*.dcm"))) == len(list(study_dir.glob("*.dcm")))


def test_fail_closed_writes_nothing(study_dir, key_file, tmp_path, capsys):
    bad = pydicom.dcmread(study_dir / "RP.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bad.StudyDate = "23.11.2026"
        bad.save_as(study_dir / "RP.dcm")
    out = tmp_path / "out"
    assert main(["anonymize", str(study_dir), "-o", str(out), "--key-file", str(key_file)]) == 1
    assert list(out.iterdir()) == []
    _, stderr = capsys.readouterr()
    assert "nothing written" in stderr and leaks(stderr.encode()) == []


def test_key_file_readable_by_others_is_refused(study_dir, key_file, tmp_path, capsys):
    key_file.chmod(0o644)
    assert main(["anonymize", str(study_dir), "--what-if", "--key-file", str(key_file)]) == 2
    assert "chmod 600" in capsys.readouterr().err


def test_out_dir_is_required_without_what_if(study_dir, key_file, capsys):
    assert main(["anonymize", str(study_dir), "--key-file", str(key_file)]) == 2
    assert "-o OUT_DIR" in capsys.readouterr().err


def test_a_key_source_is_required(study_dir):
    with pytest.raises(SystemExit):
        main(["anonymize", str(study_dir), "--what-if"])
