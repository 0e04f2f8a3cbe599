"""Settings of the distributed backends: what each backend needs is checked at load, by key."""

from __future__ import annotations

import pytest

from dicom_node.errors import ConfigError
from dicom_node.settings import settings_from_dict


@pytest.mark.parametrize(("table", "message"), [
    ({"cloud": {"backend": "ssh"}}, "cloud.ssh.hosts: the ssh backend needs at least one"),
    ({"cloud": {"backend": "ssh", "ssh": {"hosts": [{"port": 22}]}}}, r"cloud.ssh.hosts\[0\].host: required"),
    ({"cloud": {"ssh": {"hosts": [{"host": "a", "port": 70000}]}}}, r"cloud.ssh.hosts\[0\].port"),
    ({"cloud": {"ssh": {"hosts": [{"host": "a", "slots": 0}]}}}, r"cloud.ssh.hosts\[0\].slots"),
    ({"cloud": {"backend": "aws"}}, "cloud.s3.bucket: required when cloud.backend is aws"),
    ({"cloud": {"backend": "aws", "s3": {"bucket": "b"}}}, "cloud.aws.job_queue: required"),
    ({"cloud": {"sizing": {"price_per_ghz_hour": -1}}}, "cloud.sizing.price_per_ghz_hour: must be 0 or more"),
    ({"cloud": {"sizing": {"deadline_seconds": 60, "cost_cap": 1}}}, "deadline_seconds or cost_cap, not both"),
    ({"cloud": {"aws": {"kms": "x"}}}, "cloud.aws.kms: unknown key"),
])
def test_bad_cloud_values_name_the_key(table, message):
    with pytest.raises(ConfigError, match=message):
        settings_from_dict(table)


def test_backend_options_from_settings(tmp_path):
    ssh = settings_from_dict({"cloud": {"backend": "ssh", "shard_retries": 3, "ssh": {
        "known_hosts_file": "kh", "hosts": [{"host": "10.0.0.2", "key_file": "id", "slots": 2}]}}}, tmp_path)
    opts = ssh.cloud.backend_options()
    assert opts["retries"] == 3 and opts["strict_host_keys"] is True
    assert opts["known_hosts"] == (tmp_path / "kh").resolve()
    assert opts["hosts"] == [{"host": "10.0.0.2", "port": 22, "user": "mcnode",
                              "key_file": str((tmp_path / "id").resolve()), "work_dir": "/tmp/mcnode",
                              "command": "mcnode worker", "slots": 2}]
    assert "***" in str(ssh.masked())  # the key file path is masked in the start-up log
    aws = settings_from_dict({"cloud": {"backend": "aws", "s3": {"bucket": "b", "region": "eu-west-1"},
                                        "aws": {"job_queue": "q", "job_definition": "d", "kms_key_id": "k"}}})
    opts = aws.cloud.backend_options()
    assert (opts["bucket"], opts["region"], opts["command"]) == ("b", "eu-west-1", ("mcnode", "worker"))
    assert settings_from_dict({}).cloud.backend_options() == {"retries": 2, "deadline_s": 3600.0, "max_workers": 1}
    local = settings_from_dict({"cloud": {"local_workers": 2}}).cloud.backend_options()
    assert local["max_workers"] == 2  # shards side by side on this server
