"""The ``fxmerge`` console script (``fxmerge.cli:run``): exit statuses and piped output survive its fast exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.cli.conftest import ROOT, run_cli


def test_exit_statuses_and_piped_json(tmp_path: Path) -> None:
    ok = run_cli("--version", cwd=tmp_path)
    assert ok.returncode == 0 and "fxmerge, version" in ok.stdout
    usage = run_cli("no-such-command", cwd=tmp_path)
    assert usage.returncode == 2 and "No such command" in usage.stderr
    bad = run_cli("--json", "merge-tv", "missing.yaml", "out", cwd=tmp_path)
    assert bad.returncode == 2 and "error: cannot read config" in bad.stderr
    assert json.loads(bad.stdout)["error_type"] == "ConfigError"
    assert not (tmp_path / "out").exists()


def test_atexit_handlers_still_run(tmp_path: Path) -> None:
    """``run`` skips only the interpreter teardown: registered exit handlers and stream buffers are honoured."""
    marker = tmp_path / "atexit.txt"
    code = (f"import atexit, sys; sys.path.insert(0, {str(ROOT)!r}); "
            f"atexit.register(lambda: open({str(marker)!r}, 'w').write('ran')); "
            "from fxmerge.cli import run; sys.stdout.write('buffered'); run(['--version'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("bufferedfxmerge, version")
    assert marker.read_text() == "ran"
