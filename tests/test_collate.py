"""Padded batches: shapes, padding, and weights aligned with the token they weigh."""

from __future__ import annotations

import torch
from tiny import tiny_tokenizer

from granular_po.data.collate import PreferenceCollator, SFTCollator
from granular_po.data.encode import EncodeOptions, build_dataset, encode_record
from granular_po.data.masks import GranularOptions
from granular_po.data.schema import PreferenceRecord, Region, RegionFlag

PAD = 3


def feature(index, prompt, chosen, cw, rejected, rw, sft=None):
    return {"index": index, "prompt_ids": prompt, "chosen_ids": chosen, "chosen_weights": cw,
            "rejected_ids": rejected, "rejected_weights": rw, "sft_weights": sft or cw}


def test_preference_collator_by_hand():
    features = [
        feature(7, [10, 11], [20, 21, 0], [0.0, 1.0, 1.0], [30, 0], [0.5, 1.0]),
        feature(9, [12], [22, 0], [1.0, 1.0], [31, 32, 33, 0], [0.0, 1.0, 0.0, 1.0]),
    ]
    batch = PreferenceCollator(PAD)(features)
    assert batch["input_ids"].tolist() == [
        [10, 11, 20, 21, 0],
        [12, 22, 0, PAD, PAD],
        [10, 11, 30, 0, PAD],
        [12, 31, 32, 33, 0],
    ]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1] * 5]
    assert batch["loss_weights"].tolist() == [
        [0, 0, 0, 1, 1],
        [0, 1, 1, 0, 0],
        [0, 0, 0.5, 1, 0],
        [0, 0, 1, 0, 1],
    ]
    assert batch["loss_weights"].dtype == torch.float32 and batch["input_ids"].dtype == torch.long
    assert batch["index"].tolist() == [7, 9]

    padded = PreferenceCollator(PAD, pad_to_multiple_of=8)(features)
    assert padded["input_ids"].shape == (4, 8) and padded["loss_weights"][:, 5:].sum() == 0
    assert (padded["input_ids"][:, 5:] == PAD).all() and padded["attention_mask"][:, 5:].sum() == 0


def test_collators_on_encoded_records():
    tok = tiny_tokenizer("byte_level", chat=True)
    gran = GranularOptions(enabled=True, outside_weight=0.1)
    enc = EncodeOptions()
    recs = [
        PreferenceRecord("What is 7 * 8?", "The answer is 56.", "The answer is 54.", (Region(14, 16, RegionFlag.INCORRECT),),
                         index=4),
        PreferenceRecord("Capital of France?", "Paris.", "The capital of France is Madrid, I think.", (), index=11),
    ]
    ds = build_dataset(recs, tok, enc, gran)
    features = [ds[i] for i in range(len(ds))]
    batch = PreferenceCollator(tok.pad_token_id)(features)
    B, T = len(recs), batch["input_ids"].shape[1]
    assert batch["input_ids"].shape == batch["loss_weights"].shape == batch["attention_mask"].shape == (2 * B, T)
    for b, rec in enumerate(recs):
        row = encode_record(rec, tok, enc, gran)
        for r, side in ((b, "chosen"), (B + b, "rejected")):
            n_p, n = len(row["prompt_ids"]), len(row["prompt_ids"]) + len(row[f"{side}_ids"])
            assert batch["input_ids"][r, :n].tolist() == row["prompt_ids"] + row[f"{side}_ids"]
            assert torch.allclose(batch["loss_weights"][r, n_p:n], torch.tensor(row[f"{side}_weights"]))
            assert batch["loss_weights"][r, :n_p].sum() == 0 and batch["loss_weights"][r, n:].sum() == 0
            assert batch["attention_mask"][r].sum() == n
    # the end token sits at the last real position and carries its weight (row B: the rejected response
    # of record 0, the one with the region; its chosen response weighs unannotated_weight=0 throughout)
    end = batch["attention_mask"][B].sum() - 1
    assert batch["input_ids"][B, end] == tok.convert_tokens_to_ids("<|im_end|>")
    assert batch["loss_weights"][B, end] == 1.0

    sft = SFTCollator(tok.pad_token_id)(features)
    assert sft["input_ids"].shape == (B, sft["input_ids"].shape[1]) and sft["index"].tolist() == [4, 11]
    row = encode_record(recs[0], tok, enc, gran)
    n_p, n = len(row["prompt_ids"]), len(row["prompt_ids"]) + len(row["chosen_ids"])
    assert torch.allclose(sft["loss_weights"][0, n_p:n], torch.tensor(row["sft_weights"]))
    assert row["sft_weights"] != row["chosen_weights"]  # the rejected region was projected onto chosen
