"""A SAST finding's line is the engine's own line; the range ends at ``end_line``."""
from __future__ import annotations

from tests.support.scanning import commit
from workers.scanners import sast

SOURCE = '''import subprocess


def run(cmd, user):
    subprocess.call(
        cmd,
        shell=True,
    )


password = (
    "hunter2"
)
'''


def test_bandit_line_number_is_the_start_and_its_range_the_end(tmp_path):
    commit(tmp_path / "repo", {"app/run.py": SOURCE})
    result = sast.scan(str(tmp_path / "repo"), "none")
    lines = {f["rule_id"]: (f["start_line"], f["end_line"]) for f in result["findings"]}
    # bandit: B602 line_number 7 (shell=True), line_range 5-8; B105 line 12, range 11-13
    assert lines["bandit.B602"] == (7, 8)
    assert lines["bandit.B105"] == (12, 13)
