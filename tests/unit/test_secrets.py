"""No secret is printed: one redaction function for every URI shown, credentials out of the job under Ray, and the
commands that echo URIs (config, checkpoint ls / export, errors from unparseable URIs) checked with a fake secret."""

from __future__ import annotations

import pytest

from distgpt.cli import main
from distgpt.config import load_job
from distgpt.config_schema import ConfigError
from distgpt.orchestrator.credentials import split_credentials
from distgpt.redact import redact

from ..conftest import REPO

SECRET = "FAKEsecret0123"


@pytest.mark.parametrize(("text", "shown"), [
    (f"s3://AKIAFAKE:{SECRET}@bucket/run", "s3://bucket/run"),
    (f"s3://AKIAFAKE:{SECRET}/with/slash@bucket/run?endpoint_override=h:1", "s3://bucket/run"),
    (f"s3://bucket/run?access_key=A&secret_key={SECRET}", "s3://bucket/run"),
    (f"cannot parse 's3://A:{SECRET}@[bad/x?q={SECRET}' at 36", "cannot parse 's3://[bad/x' at 36"),
    (f"two: gs://b/x?token={SECRET} and s3://k:{SECRET}@c/y.", "two: gs://b/x and s3://c/y."),
    ("/local/path and builtin:python-stdlib", "/local/path and builtin:python-stdlib"),
    ("http://127.0.0.1:8000/v1/models", "http://127.0.0.1:8000/v1/models"),
])
def test_redact_removes_user_info_and_queries_even_from_unparseable_uris(text, shown):
    assert redact(text) == shown and SECRET not in redact(text)


def test_credentials_leave_the_job_and_travel_as_environment():
    job = load_job(REPO / "jobs" / "tiny.toml", [
        f"--checkpoint.uri=s3://AKIAFAKE:{SECRET.replace('0', '%2F')}@b/ck?endpoint_override=127.0.0.1:9&scheme=http",
        f"--data.prepared=s3://b/d?access_key=AKIAFAKE&secret_key={SECRET.replace('0', '/')}&region=r"])
    clean, env = split_credentials(job)
    assert clean.checkpoint.uri == "s3://b/ck?endpoint_override=127.0.0.1:9&scheme=http"
    assert clean.data.prepared == "s3://b/d?region=r"
    assert env == {"AWS_ACCESS_KEY_ID": "AKIAFAKE", "AWS_SECRET_ACCESS_KEY": SECRET.replace("0", "/")}
    assert "FAKEsecret" not in repr(clean)
    assert split_credentials(clean) == (clean, {})  # nothing to take from a clean job
    mixed = load_job(REPO / "jobs" / "tiny.toml", [f"--checkpoint.uri=s3://K:{SECRET}1@b/ck",
                                                   f"--data.prepared=s3://K:{SECRET}2@b/d"])
    with pytest.raises(ConfigError, match="different credentials.*AWS_SECRET_ACCESS_KEY") as e:
        split_credentials(mixed)
    assert SECRET not in str(e.value)


def test_commands_that_echo_uris_show_no_secret(capsys, tmp_path):
    uri = f"s3://AKIAFAKE:{SECRET}@bucket/ck?endpoint_override=127.0.0.1:9&secret_key={SECRET}"
    assert main(["config", str(REPO / "jobs" / "tiny.toml"), f"--checkpoint.uri={uri}"]) == 0
    assert main(["checkpoint", "ls", f"s3://AKIAFAKE:{SECRET}@[bad/x?secret_key={SECRET}"]) == 2
    assert main(["checkpoint", "ls", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert '"uri": "s3://bucket/ck"' in out.out and "cannot open s3://[bad/x" in out.err
    assert SECRET not in out.out + out.err and "Traceback" not in out.err
