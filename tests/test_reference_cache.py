"""`precompute_ref_log_probs=true`: the cache of reference log-probs is keyed on content, not on paths.

Reproduced defect: with the key made of `model.name_or_path` / `model.archive` strings, other weights
written under the same path reused the old reference, and the first evaluation (policy and reference
the same model) showed a reward margin of 0.0424 instead of 0.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tiny import mixed_preference_pairs, tiny_llama, tiny_tokenizer

from granular_po.apps.cli import train_main
from granular_po.training import reference_cache
from granular_po.training.trainer import GranularTrainer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer("byte_level")


def save_model(path, tok, seed: int) -> None:
    shutil.rmtree(path, ignore_errors=True)
    tiny_llama(len(tok), seed=seed).save_pretrained(path)
    tok.save_pretrained(path)


def run(root, exp: str, *extra: str) -> tuple[int, list[dict]]:
    """A one-step DPO run with precomputed reference log-probs; (times the reference ran over a dataset, logs)."""
    calls = []
    original = GranularTrainer.reference_logps

    def counting(self, dataset, batch_size):
        calls.append(len(dataset))
        return original(self, dataset, batch_size)

    argv = [
        f"model.name_or_path={root / 'model'}", "datasets=[ours]", f"custom_train_path={root / 'train.json'}",
        f"custom_eval_path={root / 'eval.json'}", f"exp_name={exp}", f"local_dirs=[{root / 'runs'}]",
        f"cache_dir={root / 'cache'}", "prompt_format=raw", "max_length=64", "max_prompt_length=32", "loss=dpo",
        "loss.beta=0.5", "granular=true", "precompute_ref_log_probs=true", "batch_size=4", "eval_batch_size=4",
        "n_epochs=1", "eval_every=4", *extra,
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GranularTrainer, "reference_logps", counting)
        assert train_main(argv) == 0
    metrics = (root / "runs" / exp / "metrics.jsonl").read_text().splitlines()
    return len(calls), [json.loads(line) for line in metrics]


def cached(root) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(str(p)) for p in sorted((root / "cache").glob("ref_logps-*.safetensors"))}


def first_eval_margin(logs: list[dict]) -> float:
    return next(r for r in logs if "rewards_eval/margins" in r)["rewards_eval/margins"]


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory, tok):
    """Weights A at `model/`; then weights B written at the same path; then B's bytes rewritten again."""
    root = tmp_path_factory.mktemp("refcache")
    (root / "train.json").write_text(json.dumps(mixed_preference_pairs()))
    (root / "eval.json").write_text(json.dumps(mixed_preference_pairs()[1:3]))
    out = []
    for exp, seed in (("a", 0), ("b", 1), ("b_again", 1)):
        save_model(root / "model", tok, seed=seed)
        calls, logs = run(root, exp)
        out.append({"calls": calls, "logs": logs, "cache": cached(root)})
    return out


def test_other_weights_under_the_same_path_are_recomputed(three_runs):
    first, second, _ = three_runs
    assert first["calls"] == 2 and len(first["cache"]) == 2  # train and eval, computed and stored
    assert second["calls"] == 2, "the old reference was reused for other weights under the same path"
    new = [v for k, v in second["cache"].items() if k not in first["cache"]]
    assert len(new) == 2
    def values(tensors):  # train and eval, chosen and rejected, in a fixed order
        return torch.cat([torch.cat([t["chosen"], t["rejected"]]) for t in sorted(tensors, key=lambda t: t["chosen"].numel())])

    old = values(first["cache"].values())
    assert old.abs().max() > 0
    assert (values(new) - old).abs().max() > 1e-3  # the numbers differ
    # the policy starts as the reference: the first evaluation's margin is 0, not a stale reference's
    for run_ in (first, second):
        assert first_eval_margin(run_["logs"]) == pytest.approx(0.0, abs=1e-6)


def test_same_weights_data_and_settings_are_reused(three_runs):
    _, second, again = three_runs
    assert again["calls"] == 0 and again["cache"].keys() == second["cache"].keys()
    assert first_eval_margin(again["logs"]) == pytest.approx(0.0, abs=1e-6)


def test_key_sees_every_setting_that_changes_the_numbers_and_no_path(tmp_path, tok):
    """The key of one trainer and dataset, then with one setting changed at a time."""
    import dataclasses

    from datasets import Dataset
    from transformers import TrainingArguments

    from granular_po.losses import LossType
    from granular_po.training.objectives import LossSettings

    def trainer(model_seed=0, **settings):
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", disable_tqdm=True)
        policy, reference = tiny_llama(len(tok), seed=model_seed), tiny_llama(len(tok), seed=model_seed)
        reference.config._name_or_path = str(tmp_path / f"elsewhere-{model_seed}")  # a path is not content
        return GranularTrainer(model=policy, ref_model=reference, args=args,
                               loss_settings=LossSettings(loss=LossType.DPO, **settings))

    data = Dataset.from_dict({"index": [0], "prompt_ids": [[1, 2]], "chosen_ids": [[4]], "chosen_weights": [[1.0]],
                              "rejected_ids": [[7]], "rejected_weights": [[1.0]]})
    base = trainer()
    key = reference_cache.cache_key(base, data, 4)
    assert reference_cache.cache_key(trainer(), data, 4) == key  # same content, another path
    assert reference_cache.cache_key(base, data, 2) != key
    assert reference_cache.cache_key(trainer(model_seed=1), data, 4) != key
    assert reference_cache.cache_key(trainer(average_log_prob=True), data, 4) != key
    assert reference_cache.cache_key(trainer(logprobs_impl="naive"), data, 4) != key
    other_route = trainer()
    other_route.route = dataclasses.replace(other_route.route, padding_free=True)
    assert reference_cache.cache_key(other_route, data, 4) != key
    assert reference_cache.cache_key(trainer(beta=0.7), data, 4) == key  # beta never reaches the reference


def test_weights_fingerprint_sees_one_changed_element_and_the_dtype(tok):
    model = tiny_llama(len(tok), seed=0)
    same = tiny_llama(len(tok), seed=0)
    base = reference_cache.weights_fingerprint(model)
    assert reference_cache.weights_fingerprint(same) == base
    with torch.no_grad():
        same.model.layers[1].mlp.down_proj.weight[3, 7] += 1e-6
    assert reference_cache.weights_fingerprint(same) != base
    assert reference_cache.weights_fingerprint(tiny_llama(len(tok), seed=0).to(torch.bfloat16)) != base


def test_data_fingerprint_sees_ids_weights_and_order(tok):
    from datasets import Dataset

    rows = {"index": [0, 1], "prompt_ids": [[1, 2], [3]], "chosen_ids": [[4], [5, 6]],
            "chosen_weights": [[1.0], [0.0, 1.0]], "rejected_ids": [[7], [8]], "rejected_weights": [[1.0], [1.0]]}
    base = reference_cache.data_fingerprint(Dataset.from_dict(rows))
    assert reference_cache.data_fingerprint(Dataset.from_dict(rows)) == base
    for column, value in [("chosen_weights", [[1.0], [0.5, 1.0]]), ("prompt_ids", [[1], [2, 3]]),
                          ("index", [1, 0])]:
        changed = Dataset.from_dict({**rows, column: value})
        assert reference_cache.data_fingerprint(changed) != base, column
    assert reference_cache.data_fingerprint(Dataset.from_dict(rows).select([1, 0])) != base
