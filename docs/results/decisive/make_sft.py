"""The default grid's styled SFT model, recreated exactly (main at 330d54e, before issue 20's fixes)."""
from pathlib import Path
from granular_po.apps import compare as c
from granular_po.apps.stages import data_fingerprint, passive_openmp, shown_command
passive_openmp()
s = c.CompareSettings(task="styled")
out = Path("report/decisive/sft-base").resolve()
data = c.make_data(out, s)
runs = out / "runs"
ov = c.sft_overrides(c.DEFAULT_MODEL, data, runs, s)
print(shown_command(ov), flush=True)
sec = c.train_in_process(ov, runs / "sft", s.sft_steps, data_fingerprint(data["train"], data["val"]), "SFT")
(out / "sft_command.txt").write_text(shown_command(ov) + "\n")
print("SFT seconds", sec)
