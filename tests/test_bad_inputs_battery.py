"""The project's battery of bad or unlucky inputs (``tests/scripts/bad_inputs.py``), run in a real process: every
input is answered with a clear one-line error or handled correctly; none is unclear, a traceback, silent or leaves
files behind, except the ones listed in :data:`PENDING` (each with what must change; the test fails once one of
them is answered, so that it is struck off)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "bad_inputs.py"

#: name -> why it is still answered wrongly (and who changes what)
PENDING: dict[str, str] = {}


@pytest.mark.slow
def test_every_bad_input_is_answered_clearly(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    out = tmp_path / "battery.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out)], capture_output=True, text=True, env=env,
                       timeout=1800, cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    kinds = {name: rec["kind"] for name, rec in json.loads(out.read_text()).items()}
    total = re.search(r"^(\d+) inputs: clear (\d+), handled (\d+), unclear (\d+), traceback (\d+), silent (\d+), "
                      r"partial (\d+)$", r.stdout, re.M)
    assert total, r.stdout[-3000:]
    n, clear, handled = int(total.group(1)), int(total.group(2)), int(total.group(3))
    assert len(kinds) == n >= 130, (len(kinds), n)  # (names are unique)
    wrong = {name: kind for name, kind in kinds.items() if kind not in ("clear", "handled") and name not in PENDING}
    assert not wrong, wrong
    struck = [name for name in PENDING if kinds.get(name) in ("clear", "handled")]
    assert not struck, f"answered now: remove {struck} from PENDING"
    assert clear + handled == n - len(PENDING)
