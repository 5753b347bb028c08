"""No micro-batch reads a value back from the device (issue 14, item 2).

On a GPU each `.item()` / `.tolist()` / `.cpu()` / `bool(t)` / `int(t)` / `torch.equal` / `torch.nonzero`
waits until all queued work is done. Here those calls are counted (patched on `torch.Tensor` and
`torch`) around a few real training steps of a tiny model, attributed to the code that made them:
ours, Trainer's and Accelerate's. Per micro-batch (forward + backward): none. Per optimizer step: one
(the non-finite guard: the step's losses and gradient norm together). Per log: one for our metrics and
one for Trainer's running loss. (The model's own code reads its attention mask once per forward, in
transformers' SDPA mask check; the optimizer's per-parameter loop reads its step counters: not ours,
and not counted here.)

The host-side facts that replace the reads (the collator's lengths and weighted positions) are checked
against what the device would have said.
"""

from __future__ import annotations

import collections
import os
import traceback

import pytest
import torch
from tiny import tiny_workspace, toy_preference_pairs

from granular_po.apps.cli import train_main
from granular_po.data.collate import PreferenceCollator, SFTCollator
from granular_po.forward.packing import pack_batch
from granular_po.forward.prompt_sharing import split_prompts
from granular_po.stats import compute_token_stats
from granular_po.training.trainer import GranularTrainer

READS = {torch.Tensor: ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__",
                        "nonzero"),
         torch: ("equal", "nonzero", "is_nonzero")}
ATTRIBUTED = (f"{os.sep}granular_po{os.sep}", f"transformers{os.sep}trainer.py", f"{os.sep}accelerate{os.sep}")


class ReadCounter:
    """Counts device reads made directly by our code, Trainer's or Accelerate's, by window."""

    def __init__(self, monkeypatch):
        self.window: str | None = None
        self.counts: dict[str, list[int]] = collections.defaultdict(list)
        self.where: collections.Counter = collections.Counter()
        for owner, names in READS.items():
            for name in names:
                monkeypatch.setattr(owner, name, self._counting(getattr(owner, name), name))
        for method, window in (("training_step", "micro-batch"), ("_get_grad_norm", "optimizer step"),
                               ("_maybe_log_save_evaluate", "log")):
            monkeypatch.setattr(GranularTrainer, method, self._windowed(getattr(GranularTrainer, method), window))

    def _counting(self, original, name):
        counter = self

        def read(*args, **kwargs):
            if counter.window is not None:
                caller = traceback.extract_stack(limit=2)[0]
                if any(part in caller.filename for part in ATTRIBUTED):
                    counter.counts[counter.window][-1] += 1
                    counter.where[(counter.window, name, os.path.basename(caller.filename), caller.lineno)] += 1
            return original(*args, **kwargs)

        return read

    def _windowed(self, original, window):
        counter = self

        def run(*args, **kwargs):
            outer, counter.window = counter.window, window
            counter.counts[window].append(0)
            try:
                return original(*args, **kwargs)
            finally:
                counter.window = outer

        return run


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.mktemp("syncs"), toy_preference_pairs(16, filler_cycle=3))


@pytest.mark.parametrize("route", [
    ["loss=tdpo", "loss.beta=0.5", "share_prompt=auto"],  # the default route for preference losses
    ["loss=dpo", "loss.beta=0.5", "share_prompt=false", "padding_free=true"],
], ids=["tdpo-shared-prompt", "dpo-packed"])
def test_no_device_read_per_micro_batch(workspace, monkeypatch, route):
    counter = ReadCounter(monkeypatch)
    argv = [
        f"model.name_or_path={workspace / 'tiny'}", "datasets=[ours]", f"custom_train_path={workspace / 'train.json'}",
        "exp_name=syncs", f"local_dirs=[{workspace / 'runs'}]", "prompt_format=raw", "max_length=64",
        "max_prompt_length=32", "granular=true", "batch_size=8", "gradient_accumulation_steps=4", "n_epochs=1",
        "optimizer=AdamW", "lr=1e-3", "warmup_steps=0", "do_first_eval=false", "debug=true", *route,
    ]
    assert train_main(argv) == 0
    detail = dict(counter.where)
    assert counter.counts["micro-batch"] == [0] * 8, detail  # 16 records / 2 per micro-batch
    assert counter.counts["optimizer step"] == [1, 1], detail  # the guard's one read
    # our metrics' one read and Trainer's running loss, at each step's log (the epoch's end logs nothing new)
    assert counter.counts["log"] == [2, 2, 0], detail


# ---------------------------------------------------------------- the host-side facts are right


def features(n: int = 5):
    """Pairs of mixed prompt / response lengths with some zero weights, one with an empty prompt."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        p, c, r = (i * 3) % 7, 2 + (i * 5) % 6, 1 + (i * 2) % 5
        weights = lambda k: [float(w) for w in (torch.rand(k, generator=gen) > 0.4)]  # noqa: E731
        out.append({"index": 10 + i, "prompt_ids": list(range(1, p + 1)), "chosen_ids": list(range(20, 20 + c)),
                    "rejected_ids": list(range(40, 40 + r)), "chosen_weights": weights(c),
                    "rejected_weights": weights(r), "sft_weights": weights(c)})
    return out


@pytest.mark.parametrize("collator", [PreferenceCollator, SFTCollator])
def test_collator_lists_what_the_device_would_say(collator):
    batch = collator(pad_token_id=0)(features())
    weights, mask = batch["loss_weights"], batch["attention_mask"]
    assert torch.equal(batch["weighted_positions"], torch.stack(torch.nonzero(weights[:, 1:] != 0, as_tuple=True)))
    assert batch["host"]["lengths"] == mask.sum(-1).tolist()
    prompt = mask.sum(-1) - batch.get("response_mask", mask).sum(-1) if "response_mask" in batch else None
    if prompt is not None:
        assert batch["host"]["prompt_lengths"] == prompt.tolist()
    assert batch["host"]["index"] == batch["index"].tolist()


def test_host_layouts_equal_the_device_ones():
    batch = PreferenceCollator(pad_token_id=0)(features())
    ids, mask, response_mask = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    host = batch["host"]
    from_masks = split_prompts(ids, mask, response_mask)
    from_host = split_prompts(ids, mask, response_mask, lengths=host["lengths"], prompt_lengths=host["prompt_lengths"])
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "position_ids", "source_index",
                 "target_index"):
        assert torch.equal(getattr(from_host, name), getattr(from_masks, name)), name
    for one_row in (False, True):
        a = pack_batch(ids, mask, 0, one_row=one_row)
        b = pack_batch(ids, mask, 0, one_row=one_row, lengths=host["lengths"])
        for name in ("input_ids", "position_ids", "padded_index", "packed_index"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_listed_weighted_positions_give_the_same_statistics():
    batch = PreferenceCollator(pad_token_id=0)(features())
    torch.manual_seed(0)
    n, t = batch["input_ids"].shape
    hidden = torch.randn(n, t, 16, requires_grad=True)
    head = torch.nn.Linear(16, 60, bias=False)
    ref_hidden = torch.randn(n, t, 16)
    args = (hidden, head, ref_hidden, head, batch["input_ids"], batch["loss_weights"])
    plain = compute_token_stats(*args, need_kl=True, chunk_size=4)
    listed = compute_token_stats(*args, need_kl=True, chunk_size=4, weighted_positions=batch["weighted_positions"])
    for field in ("policy_logps", "logratio", "position_kl"):
        assert torch.equal(getattr(plain, field), getattr(listed, field)), field
