"""Importing a library module changes nothing outside it: no matplotlib backend, no pynetdicom switch."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import matplotlib
from pynetdicom import _config

backend = dict.__getitem__(matplotlib.rcParams, "backend")  # the raw value: reading it does not resolve it
chunked = _config.STORE_SEND_CHUNKED_DATASET
import dicom_node.cli, dicom_node.jobs.node, dicom_node.net.scu, dicom_node.qa.report, dicom_node.qa.secondcheck
import dicom_node.web.pictures
assert dict.__getitem__(matplotlib.rcParams, "backend") == backend, "the matplotlib backend was changed"
assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
assert _config.STORE_SEND_CHUNKED_DATASET == chunked, "a pynetdicom switch was set"
print("ok")
"""


def test_importing_the_node_has_no_side_effects():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
