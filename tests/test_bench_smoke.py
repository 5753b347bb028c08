"""`bench/step.py` runs end to end on a tiny random model: one step per configuration, a table out.

The real benchmark (SmolLM2-135M, 4 pairs x 256 tokens, fresh process per configuration) takes minutes
and runs through `make bench`; this only checks that its code paths (ours through `run_training`,
TRL's DPOTrainer, the micro-benchmarks, the report) still work with the code they drive.
"""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
from tiny import tiny_llama, tiny_tokenizer

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_step():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_step", BENCH / "step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-model")
    tokenizer = tiny_tokenizer("byte_level", chat=True)
    tokenizer.save_pretrained(root)
    tiny_llama(len(tokenizer), hidden_size=32).save_pretrained(root)
    return root


def weighted_share(model_dir: Path, n_pairs: int, seq_len: int, **granular) -> float:
    """Share of response tokens with a non-zero weight in the bench's granular data, counted here
    (`granular`: GranularOptions keys beyond enabled=True)."""
    import workloads  # bench/, on sys.path after load_step

    from granular_po.data.encode import build_dataset
    from granular_po.data.masks import GranularOptions
    from granular_po.data.records import parse_record
    from granular_po.models import load_tokenizer

    pairs = workloads.make_pairs(n_pairs, words_per_response=2 * seq_len)
    records = [parse_record(p, "bench", i) for i, p in enumerate(pairs)]
    rows = build_dataset(records, load_tokenizer(str(model_dir)), workloads.encode_options(seq_len),
                         GranularOptions(enabled=True, **granular)).to_list()
    weights = [w for r in rows for k in ("chosen_weights", "rejected_weights") for w in r[k]]
    return sum(w != 0 for w in weights) / len(weights)


@pytest.fixture
def one_thread():
    """Tiny ops on two threads of a busy machine spend most of their time in OpenMP barriers."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_bench_runs_one_step_per_configuration(tiny_model_dir, tmp_path, one_thread):
    step = load_step()
    out = tmp_path / "results.md"
    argv = ["--model", str(tiny_model_dir), "--steps", "1", "--warmup", "1", "--batch", "2", "--seq-len", "48",
            "--configs", "sft,dpo,tdpo,tdpo-gran,trl-dpo", "--in-process", "--matmul-size", "256", "--out", str(out)]
    assert step.main(argv) == 0
    text = out.read_text()
    for label in ("| SFT |", "| DPO |", "| TDPO chunked |", "| TDPO chunked, granular |", "| TRL DPOTrainer |"):
        assert label in text
    assert "our DPO throughput" in text and "logits-related peak" in text
    # the granular run really weighs a fraction of the response tokens; the others all of them
    row = next(line for line in text.splitlines() if line.startswith("| TDPO chunked, granular |"))
    share = int(row.split("|")[3].strip().rstrip("%"))
    expected = weighted_share(tiny_model_dir, n_pairs=2 * 2, seq_len=48)  # batch 2 x (warmup 1 + 1 step)
    assert share == round(100 * expected) and expected < 0.5


def test_objective_option_rows(tiny_model_dir, tmp_path, one_thread):
    """issue 21's options, each beside today's granular TDPO2: every configuration trains, its weighted share
    is that of its own keys (sides=rejected weighs the whole chosen response, drop cuts the rejected one after
    its first error), and the report gives each option's time and CPU time against tdpo2-gran."""
    step = load_step()
    out = tmp_path / "results.md"
    argv = ["--model", str(tiny_model_dir), "--steps", "1", "--warmup", "0", "--batch", "2", "--seq-len", "48",
            "--configs", "tdpo2-gran+tdpo-klall+tdpo-nll+tdpo-rejected+tdpo-drop", "--in-process", "--no-micro",
            "--out", str(out)]
    assert step.main(argv) == 0
    text = out.read_text()
    shares = {}
    for label in ("granular", "granular, kl_weights=all", "granular, nll_alpha=1", "granular, sides=rejected",
                  "granular, after_first_error=drop"):
        row = next(line for line in text.splitlines() if line.startswith(f"| TDPO2 chunked, {label} |"))
        shares[label] = int(row.split("|")[3].strip().rstrip("%"))
    today = weighted_share(tiny_model_dir, n_pairs=2, seq_len=48)
    rejected = weighted_share(tiny_model_dir, n_pairs=2, seq_len=48, sides="rejected")
    drop = weighted_share(tiny_model_dir, n_pairs=2, seq_len=48, after_first_error="drop")
    assert drop < today < rejected
    assert shares == {"granular": round(100 * today), "granular, kl_weights=all": round(100 * today),
                      "granular, nll_alpha=1": round(100 * today), "granular, sides=rejected": round(100 * rejected),
                      "granular, after_first_error=drop": round(100 * drop)}
    for key in ("granular.kl_weights=all", "loss.nll_alpha=1", "granular.sides=rejected",
                "granular.after_first_error=drop"):
        assert re.search(rf"\| granular TDPO2 with `{re.escape(key)}` .* \| [\d.]+x time \(CPU time [\d.]+x\) \| n/a \|",
                         text), key


def test_interleaved_processes_take_turns(tiny_model_dir, tmp_path, monkeypatch):
    """Two configurations in fresh processes, step by step in turn: both finish with their own figures."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    step = load_step()
    argv = ["--model", str(tiny_model_dir), "--steps", "2", "--warmup", "1", "--batch", "2", "--seq-len", "48",
            "--configs", "trl-dpo+tdpo-gran", "--no-micro", "--out", str(tmp_path / "results.md")]
    args = step.parse_args(argv)
    (group,) = step.groups(args)
    results = step.run_interleaved(group, tmp_path)
    assert set(results) == {"trl-dpo", "tdpo-gran"}
    for r in results.values():
        assert len(r["step_s"]) == 2 and all(t > 0 for t in r["step_s"])
        assert r["peak_rss_mb"] > 0
    expected = weighted_share(tiny_model_dir, n_pairs=2 * 3, seq_len=48)  # batch 2 x (warmup 1 + 2 steps)
    assert results["tdpo-gran"]["weighted_share"] == pytest.approx(expected) and expected < 0.5


def test_a_worker_that_dies_is_reported(tmp_path):
    """A process that dies before its turn: the driver names it and shows its log instead of hanging."""
    step = load_step()
    broken = {"kind": "matmul", "name": "broken", "sizes": ["not a size"], "warmup": 0, "steps": 1}
    with pytest.raises(RuntimeError, match="configuration broken died"):
        step.run_interleaved([broken], tmp_path)
