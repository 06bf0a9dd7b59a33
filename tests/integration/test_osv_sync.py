"""``exploop-agent osv-sync`` against a real local HTTP server."""
from __future__ import annotations

import functools
import http.server
import os
import threading
import zipfile

import pytest
from click.testing import CliRunner

from tests.support.scanning import SHARED_OSV, needs_shared_osv
from workers.agent import main


@pytest.fixture
def server(tmp_path):
    """http.server serving ``tmp_path/site`` on a free loopback port (If-Modified-Since aware)."""
    site = tmp_path / "site"
    site.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield site, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _npm_zip(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("GHSA-1.json", '{"id": "GHSA-1", "affected": []}')
        archive.writestr("GHSA-2.json", '{"id": "GHSA-2", "affected": []}')


@needs_shared_osv
def test_sync_downloads_then_reports_current(server, tmp_path):
    site, url = server
    (site / "PyPI").mkdir()
    (site / "PyPI" / "all.zip").write_bytes((SHARED_OSV / "PyPI" / "all.zip").read_bytes())
    _npm_zip(site / "npm" / "all.zip")
    db = tmp_path / "db"
    runner = CliRunner()
    first = runner.invoke(main, ["osv-sync", "--base-url", url, "--ecosystem", "PyPI", "--ecosystem", "npm"],
                          env={"OSV_DB_DIR": str(db)})
    assert first.exit_code == 0, first.output
    assert first.stdout.splitlines() == ["PyPI: 2661 advisories, 2.3 MiB (downloaded)",
                                         "npm: 2 advisories, 0.0 MiB (downloaded)"]
    assert (db / "PyPI" / "all.zip").read_bytes() == (SHARED_OSV / "PyPI" / "all.zip").read_bytes()
    second = runner.invoke(main, ["osv-sync", "--db-dir", str(db), "--base-url", url, "--ecosystem", "PyPI"])
    assert second.exit_code == 0, second.output
    assert second.stdout.strip() == "PyPI: 2661 advisories, 2.3 MiB (already current)"
    assert sorted(p.name for p in (db / "PyPI").iterdir()) == ["all.zip"]  # no temporary files left


def test_failures_name_the_ecosystem_and_keep_the_old_copy(server, tmp_path):
    site, url = server
    _npm_zip(site / "npm" / "all.zip")
    (site / "Go").mkdir()
    (site / "Go" / "all.zip").write_text("<html>not a zip</html>")
    db = tmp_path / "db"
    _npm_zip(db / "Go" / "all.zip")  # a previous good copy, older than the server's
    os.utime(db / "Go" / "all.zip", (946684800, 946684800))
    before = (db / "Go" / "all.zip").read_bytes()
    result = CliRunner().invoke(main, ["osv-sync", "--db-dir", str(db), "--base-url", url, "--ecosystem",
                                       "npm", "--ecosystem", "Go", "--ecosystem", "PyPI"])
    assert result.exit_code == 1
    assert result.stdout.strip() == "npm: 2 advisories, 0.0 MiB (downloaded)"
    assert "Go: the download is not a zip archive" in result.stderr
    assert f"PyPI: {url}/PyPI/all.zip answered HTTP 404" in result.stderr
    assert (db / "Go" / "all.zip").read_bytes() == before
    assert sorted(p.name for p in (db / "Go").iterdir()) == ["all.zip"]


def test_unreachable_server_and_missing_db_dir(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["osv-sync", "--db-dir", str(tmp_path / "db"), "--base-url",
                                  "http://127.0.0.1:9", "--ecosystem", "npm", "--timeout", "2"])
    assert result.exit_code == 1
    assert "osv-sync failed: npm: cannot reach http://127.0.0.1:9/npm/all.zip" in result.stderr
    missing = runner.invoke(main, ["osv-sync"], env={"OSV_DB_DIR": ""})
    assert missing.exit_code == 2 and "--db-dir" in missing.stderr
