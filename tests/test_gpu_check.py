"""`bench/gpu_check.sh --dry-run`: the GPU check's every step on a tiny model on the CPU (issue 14, item 4).

The real check (SmolLM2-1.7B's shape, bf16 on CUDA) needs a GPU; this runs the same script end to end
(the model built from a config with the embedded tokenizer, bench/step.py with --dtype bf16 for ours and
TRL's DPOTrainer, bench/stats_check.py, one trainer=FSDPTrainer step through torchrun) so that it cannot
rot while no GPU is at hand. About 50 s on two idle cores.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(400)
def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "GPU_CHECK_DIR": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=380)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    report = (tmp_path / "gpu_results.md").read_text()
    assert report.startswith("# GPU check (issue 14): CPU (dry run)")
    for row in ("| TRL DPOTrainer |", "| DPO |", "| TDPO chunked |", "| TDPO naive |", "| TDPO chunked, granular |",
                "| SFT |"):
        assert row in report, row
    assert "bf16 autocast over fp32 weights" in report and "AdamW (fused)" in report
    assert "| naive |" in report and "| chunked (256) |" in report
    assert "chunked no less accurate than naive: yes" in report
    assert "One step of granular TDPO2" in report and "loss 0.6931" in report  # policy = reference at step 1
    assert not (REPO / "bench" / "gpu_results.md").exists() or "dry run" not in (REPO / "bench" / "gpu_results.md").read_text()
