"""Pilot (issue 22 plan): the SFT model's forced-decoding margins on the validation questions, never the test ones.

Run from the repository root after the SFT model exists: PYTHONPATH=src .venv/bin/python docs/results/decisive/pilot_sft_margin.py
"""
import statistics
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from granular_po.apps import compare_metrics as cm
from granular_po.data import synthetic
sft = Path("report/decisive/sft-base/runs/sft/LATEST").resolve()
tok = AutoTokenizer.from_pretrained(sft); model = AutoModelForCausalLM.from_pretrained(sft)
for conf in (1.0, 0.75):
    tr, val, te = synthetic.split_questions(512, 32, 200, task="styled", seed=0, confound=conf, highlight="digits")
    items = [it for it in (cm.forced_item(p) for p in val) if it]
    m = cm.forced_margins(model, tok, items)
    print(conf, len(val), len(items), "acc", sum(x > 0 for x in m) / len(m), "mean", statistics.mean(m),
          "sorted", [round(x, 1) for x in sorted(m)][:12])
    print(items[0], items[1])
