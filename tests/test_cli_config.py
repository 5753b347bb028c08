"""The training command line as a user meets it, each case through the real command in a subprocess:
bad configurations refused in one line before anything heavy is imported (issues 11.11, 13.2), and
`--help` (issue 13.1)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path | None = None, script: bool = False, timeout: int = 120) -> subprocess.CompletedProcess:
    """`granular-po train ARGS` (or `python train.py ARGS`), as a user types it."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    command = [sys.executable, str(REPO / "train.py")] if script else [
        sys.executable, "-m", "granular_po.apps.cli", "train"]
    return subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("override", ["loss.betta=0.1", "+loss.betta=0.1", "++loss.betta=0.1"])
def test_unknown_loss_key_refused_also_when_appended(override, tmp_path):
    """Issue 11.11: Hydra's own advice (`+loss.betta=0.1`) used to train with the key silently dropped."""
    done = cli("loss=dpo", override, f"local_dirs=[{tmp_path}]", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == ("config error: unknown key 'loss.betta'; did you mean loss.beta? (keys here: "
                                   "name, beta, reference_free, average_log_prob, label_smoothing, alpha)")
    assert list(tmp_path.iterdir()) == []
