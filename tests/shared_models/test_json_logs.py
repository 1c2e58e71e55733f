"""``--log-format json``: one JSON object per line, levels from Flower's lines, nothing lost between writes."""

import io
import json
import subprocess
import sys
from pathlib import Path

from shared_models.json_logs import JsonLineStream

REPO = Path(__file__).resolve().parents[2]


def _records(buffer):
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_lines_split_across_writes_are_one_record_each_with_the_level_of_flower():
    out = io.StringIO()
    stream = JsonLineStream(out, "info", {"component": "fedsite-client", "site": "site-a"})
    stream.write("fedsite client: site site-a, 6 ima")
    assert out.getvalue() == ""  # nothing until the line is complete
    stream.write("ges\n\x1b[33mWARNING \x1b[0m:   Connection attempt failed, retrying\n\nlast")
    stream.close_pending()
    records = _records(out)
    assert [r["message"] for r in records] == ["fedsite client: site site-a, 6 images", "Connection attempt failed, retrying", "last"]
    assert [r["level"] for r in records] == ["info", "warning", "info"]
    assert all(r["component"] == "fedsite-client" and r["site"] == "site-a" and r["time"].endswith("+00:00") for r in records)


def test_a_daemon_error_in_json_mode_is_one_json_line_on_stderr(tmp_path):
    missing = tmp_path / "site-a.yaml"
    done = subprocess.run([sys.executable, "-m", "simulations.cli", "client", "--log-format", "json", "--config", str(missing)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    record = json.loads(lines[0])
    assert record["level"] == "error" and record["component"] == "fedsite-client"
    assert "configuration error" in record["message"] and str(missing) in record["message"]
