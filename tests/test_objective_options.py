"""Objective options (issue 21): `granular.kl_weights`, `loss.nll_alpha`, `granular.sides`,
`granular.after_first_error`.

Each is pinned by a closed-form loss and gradient on hand-made tensors (the maths in the docstring),
then checked through every statistics path: naive, chunked (fused and checkpointed), shared prompt and
packed, through the trainer's own `loss_and_metrics` on collated batches (host-side positions included).
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer
from torch import nn
from transformers import TrainingArguments

from granular_po.data.collate import PreferenceCollator
from granular_po.data.encode import EncodeOptions, encode_record
from granular_po.data.masks import GranularOptions
from granular_po.data.schema import PreferenceRecord, Region, RegionFlag
from granular_po.losses import LossType
from granular_po.stats import compute_token_stats
from granular_po.training.config import ConfigError, _free_on_resume, compose_config, validate
from granular_po.training.objectives import LossSettings, compute_objective
from granular_po.training.trainer import GranularTrainer

# ---------------------------------------------------------------- hand-made tensors

BETA, ALPHA = 0.5, 0.7
# one pair: row 0 chosen, row 1 rejected; position 0 is the prompt, 1..3 the response (3 its end token)
IDS = torch.tensor([[0, 1, 2, 0], [0, 2, 2, 1]])
MARGIN_W = torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0]])  # the highlights (and end tokens)
RESPONSE = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])  # every response token
# logits at positions 0..2 predict the targets at 1..3 (V = 3); the last position predicts nothing
POLICY_Z = torch.tensor([
    [[0.5, -1.0, 0.2], [1.5, 0.0, -0.5], [0.3, 0.3, -2.0], [0.0, 0.0, 0.0]],
    [[-0.4, 0.9, 0.1], [2.0, -1.0, 0.5], [0.0, -0.7, 1.1], [0.0, 0.0, 0.0]],
], dtype=torch.float64)
REF_Z = torch.tensor([
    [[0.1, 0.1, 0.1], [1.0, 0.5, -0.5], [0.0, 1.0, -1.0], [0.0, 0.0, 0.0]],
    [[0.0, 0.5, 0.0], [1.0, 0.0, 0.0], [0.5, -0.5, 0.5], [0.0, 0.0, 0.0]],
], dtype=torch.float64)


def softmax(z: list[float]) -> list[float]:
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def by_hand(row: int, t: int) -> tuple[float, float, float, list[float], list[float]]:
    """Target log-prob under policy and reference, KL(ref || policy), p and p_ref at target position t."""
    p, q = softmax(POLICY_Z[row, t - 1].tolist()), softmax(REF_Z[row, t - 1].tolist())
    target = int(IDS[row, t])
    kl = sum(qv * (math.log(qv) - math.log(pv)) for pv, qv in zip(p, q))
    return math.log(p[target]), math.log(q[target]), kl, p, q


def stats_of(z: torch.Tensor, impl: str, **weights):
    return compute_token_stats(None, None, None, None, IDS, MARGIN_W, need_kl=True, policy_logits=z,
                               ref_logits=REF_Z, impl=impl, chunk_size=2, **weights)


def tdpo2(settings: LossSettings, stats) -> torch.Tensor:
    losses, _ = compute_objective(settings, stats, 1, "train")
    return losses.sum()


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_kl_weights_all_closed_form_loss_and_gradient(impl):
    """TDPO2 with the margin on the highlights and the KL on every response token.

    m_w = sum_t w_t (log p(y_t) - log p_ref(y_t)), D_w = sum_t k_t KL_t (k = 1 on every response token),
    u = m_c - m_r - alpha (D_r - sg(D_c)), L = -log sigma(beta u).
    dL/dz_t = -beta sigma(-beta u) du/dz_t, with d log p(y_t)/dz_t = onehot(y_t) - p_t and
    dKL_t/dz_t = p_t - p_ref_t: chosen rows w_t (onehot - p); rejected rows -w_t (onehot - p) - alpha k_t (p - p_ref).
    With k = w (kl_weights=highlight) a rejected position of weight 0 would get no gradient at all.
    """
    margins, kls = [], []
    for row in (0, 1):
        rows = [by_hand(row, t) for t in (1, 2, 3)]
        margins.append(sum(float(MARGIN_W[row, t]) * (lp - lq) for t, (lp, lq, *_rest) in zip((1, 2, 3), rows)))
        kls.append(sum(float(RESPONSE[row, t]) * kl for t, (_, _, kl, *_rest) in zip((1, 2, 3), rows)))
    u = margins[0] - margins[1] - ALPHA * (kls[1] - kls[0])
    expected = -math.log(1 / (1 + math.exp(-BETA * u)))
    dldu = -BETA / (1 + math.exp(BETA * u))
    expected_grad = torch.zeros_like(POLICY_Z)
    for row, sign in ((0, 1.0), (1, -1.0)):
        for t in (1, 2, 3):
            *_, p, q = by_hand(row, t)
            onehot = [1.0 if v == int(IDS[row, t]) else 0.0 for v in range(3)]
            for v in range(3):
                du = sign * float(MARGIN_W[row, t]) * (onehot[v] - p[v])
                if row == 1:
                    du -= ALPHA * float(RESPONSE[row, t]) * (p[v] - q[v])
                expected_grad[row, t - 1, v] = dldu * du

    settings = LossSettings(loss=LossType.TDPO, beta=BETA, alpha=ALPHA, if_tdpo2=True, kl_weights="all")
    z = POLICY_Z.clone().requires_grad_(True)
    loss = tdpo2(settings, stats_of(z, impl, **settings.statistic_weights(
        {"loss_weights": MARGIN_W, "response_mask": RESPONSE.long()})))
    loss.backward()
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(z.grad, expected_grad, rtol=1e-10, atol=1e-12)
    assert z.grad[1, 0].abs().sum() > 1e-3  # a rejected position outside the highlights, anchored by the KL

    # today's default: the KL on the highlight weights, so that position gets nothing
    z = POLICY_Z.clone().requires_grad_(True)
    default = LossSettings(loss=LossType.TDPO, beta=BETA, alpha=ALPHA, if_tdpo2=True)
    assert default.statistic_weights({"loss_weights": MARGIN_W}) == {}
    tdpo2(default, stats_of(z, impl)).backward()
    assert z.grad[1, 0].abs().sum() == 0


# ---------------------------------------------------------------- hidden states and heads: every fast path


def problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, t, h, v = 4, 9, 8, 23
    hidden, ref_hidden = torch.randn(n, t, h, generator=g), torch.randn(n, t, h, generator=g)
    head, ref_head = nn.Linear(h, v), nn.Linear(h, v)
    for module in (head, ref_head):
        for p in module.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5
    ids = torch.randint(0, v, (n, t), generator=g)
    response = torch.zeros(n, t)
    response[:, 3:] = 1.0
    response[1, 7:] = 0.0  # a shorter row
    margin = response * (torch.rand(n, t, generator=g) > 0.6)  # sparse highlights
    nll = response.clone()
    nll[n // 2:] = 0.0  # chosen rows only
    return hidden, ref_hidden, head, ref_head, ids, margin, {"kl_weights": response, "nll_weights": nll}


def path_result(impl: str, fused: bool, average: bool, **extra):
    hidden, ref_hidden, head, ref_head, ids, margin, _ = problem()
    hidden = hidden.double().requires_grad_(True)
    head, ref_head = head.double(), ref_head.double()
    stats = compute_token_stats(hidden, head, ref_hidden.double(), ref_head, ids, margin, need_kl=True,
                                average=average, impl=impl, chunk_size=3, fused=fused, **extra)
    objective = (stats.logratio * torch.tensor([1.0, -2, 3, -1])).sum() + 0.3 * stats.position_kl.sum()
    if stats.nll is not None:
        objective = objective + 0.7 * stats.nll.sum()
    grads = torch.autograd.grad(objective, [hidden, *head.parameters()])
    return stats, grads


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("keys", [("kl_weights",), ("nll_weights",), ("kl_weights", "nll_weights")])
def test_extra_weights_chunked_and_fused_match_naive(keys, average):
    extra = {k: problem()[-1][k] for k in keys}
    truth = path_result("naive", True, average, **extra)
    plain = path_result("naive", True, average)
    if "kl_weights" in keys:  # the option changes the KL, so the comparison below bites
        assert (truth[0].position_kl - plain[0].position_kl).abs().max() > 1e-3
    for fused in (True, False):
        got = path_result("chunked", fused, average, **extra)
        for field in ("policy_logps", "logratio", "position_kl", "nll"):
            a, b = getattr(got[0], field), getattr(truth[0], field)
            assert (a is None) == (b is None), field
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=field)
        for a, b in zip(got[1], truth[1]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------- the trainer on collated batches: every route


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer("byte_level")


def records() -> list[PreferenceRecord]:
    texts = [
        ("What is 7 * 8?", "The answer is 56, so 56.", "The answer is 54, so 54 it is."),
        ("Hello world!", "Hello there, a tiny corpus.", "Hello there, a lazy corpus of words."),
        ("The capital of France is", " Paris. The capital of Spain is Madrid.",
         " Paris. The capital of Spain is Paris. The quick brown fox jumps over the lazy dog."),
    ]
    out = []
    for i, (prompt, chosen, rejected) in enumerate(texts):
        start = next(k for k, (a, b) in enumerate(zip(chosen, rejected)) if a != b)
        region = Region(start, min(start + 3, len(rejected)), RegionFlag.INCORRECT)
        out.append(PreferenceRecord(prompt, chosen, rejected, (region,), index=i))
    return out


def batch_of(tokenizer, **gran) -> dict:
    enc = EncodeOptions(max_length=128, max_prompt_length=32, prompt_format="raw")
    options = GranularOptions(enabled=True, **gran)
    return PreferenceCollator(tokenizer.pad_token_id)([encode_record(r, tokenizer, enc, options) for r in records()])


@pytest.fixture(scope="module")
def models(tokenizer):
    return tiny_llama(len(tokenizer), hidden_size=32, seed=0), tiny_llama(len(tokenizer), hidden_size=32, seed=1)


ROUTES = {  # name: (logprobs.impl, share_prompt, padding_free)
    "naive": ("naive", "false", False),
    "chunked": ("chunked", "false", False),
    "shared-prompt": ("chunked", "true", False),
    "packed": ("chunked", "false", True),
}


def route_run(models, tmp_path, route: str, settings: dict, batch: dict):
    impl, share, packed = ROUTES[route]
    policy, reference = models
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", disable_tqdm=True)
    trainer = GranularTrainer(
        model=policy, ref_model=reference, args=args, share_prompt=share, padding_free=packed,
        loss_settings=LossSettings(logprobs_impl=impl, chunk_size=7, **settings),
        data_collator=PreferenceCollator(pad_token_id=0),
    )
    assert trainer.route.share_prompt == (share == "true") and trainer.route.padding_free == packed
    policy.zero_grad()
    loss, metrics = trainer.loss_and_metrics(policy, batch, "train")
    loss.backward()
    grads = {k: p.grad.clone() for k, p in policy.named_parameters()}
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, grads


def assert_routes_agree(models, tmp_path, settings: dict, batch: dict, differs_from: dict | None = None):
    """Every route gives the naive route's loss, metrics and gradients (and, where `differs_from` names
    other settings, the option changed the loss: the agreement is not the default's)."""
    truth = route_run(models, tmp_path, "naive", settings, batch)
    if differs_from is not None:
        other = route_run(models, tmp_path, "naive", differs_from, batch)
        assert abs(other[0].item() - truth[0].item()) > 1e-4
    for route in ("chunked", "shared-prompt", "packed"):
        loss, metrics, grads = route_run(models, tmp_path, route, settings, batch)
        torch.testing.assert_close(loss, truth[0], rtol=1e-5, atol=1e-6, msg=route)
        for key, value in truth[1].items():
            torch.testing.assert_close(metrics[key], value, rtol=1e-5, atol=1e-5, msg=f"{route} {key}")
        for key, value in truth[2].items():
            torch.testing.assert_close(grads[key], value, rtol=1e-4, atol=1e-6, msg=f"{route} {key}")
    return truth


TDPO2 = {"loss": LossType.TDPO, "beta": 0.5, "alpha": 0.5, "if_tdpo2": True}


def test_kl_weights_all_through_every_route(models, tokenizer, tmp_path):
    """The collator's host-side positions must then cover every response token, not only the weighted."""
    batch = batch_of(tokenizer)
    assert batch["response_positions"].shape[1] > 2 * batch["weighted_positions"].shape[1]
    truth = assert_routes_agree(models, tmp_path, {**TDPO2, "kl_weights": "all"}, batch, differs_from=TDPO2)
    # the KL now covers every response token: positive on rows whose highlights alone weigh nothing
    assert (truth[1]["kl_train/chosen"] > 0).all()


# ---------------------------------------------------------------- configuration


def test_kl_weights_key_from_the_command_line():
    cfg = compose_config(["loss=tdpo", "granular=true", "granular.kl_weights=all"])
    assert cfg.granular.kl_weights == "all"
    assert LossSettings.from_config(cfg, LossType.TDPO).kl_over_all_tokens
    assert not LossSettings.from_config(compose_config(["loss=dpo", "granular.kl_weights=all"]),
                                        LossType.DPO).kl_over_all_tokens  # DPO's KL is only logged
    assert compose_config(["loss=tdpo"]).granular.kl_weights == "highlight"
    with pytest.raises(ConfigError, match="granular.kl_weights='every'.*highlight, all"):
        compose_config(["granular.kl_weights=every"])
    assert not _free_on_resume("granular.kl_weights")  # it changes the numbers


# ---------------------------------------------------------------- loss.nll_alpha


NLL_ALPHA = 0.8


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_nll_alpha_closed_form_loss_and_gradient(impl):
    """DPO plus alpha x the chosen response's mean NLL over ALL its tokens (3 here, whatever the highlights).

    L = -log sigma(beta (m_c - m_r)) + alpha * nll, nll = -(1/3) sum_{t=1..3} log p(y_t | chosen).
    dL/dz_t (chosen) = -beta sigma(-beta d) w_t (onehot - p) - (alpha / 3) (onehot - p);
    dL/dz_t (rejected) = +beta sigma(-beta d) w_t (onehot - p), with d = m_c - m_r.
    """
    margins = [sum(float(MARGIN_W[row, t]) * (by_hand(row, t)[0] - by_hand(row, t)[1]) for t in (1, 2, 3))
               for row in (0, 1)]
    nll = -sum(by_hand(0, t)[0] for t in (1, 2, 3)) / 3
    d = margins[0] - margins[1]
    expected = -math.log(1 / (1 + math.exp(-BETA * d))) + NLL_ALPHA * nll
    dldm = -BETA / (1 + math.exp(BETA * d))
    expected_grad = torch.zeros_like(POLICY_Z)
    for row, sign in ((0, 1.0), (1, -1.0)):
        for t in (1, 2, 3):
            p = by_hand(row, t)[3]
            for v in range(3):
                dlogp = (1.0 if v == int(IDS[row, t]) else 0.0) - p[v]
                expected_grad[row, t - 1, v] = sign * dldm * float(MARGIN_W[row, t]) * dlogp
                if row == 0:
                    expected_grad[row, t - 1, v] -= NLL_ALPHA / 3 * dlogp

    settings = LossSettings(loss=LossType.DPO, beta=BETA, nll_alpha=NLL_ALPHA)
    z = POLICY_Z.clone().requires_grad_(True)
    stats = stats_of(z, impl, **settings.statistic_weights({"loss_weights": MARGIN_W, "response_mask": RESPONSE}))
    losses, metrics = compute_objective(settings, stats, 1, "train")
    losses.sum().backward()
    assert losses.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["nll_train/chosen"].item() == pytest.approx(nll, rel=1e-12)
    torch.testing.assert_close(z.grad, expected_grad, rtol=1e-10, atol=1e-12)
    assert z.grad[0, 1].abs().sum() > 1e-3  # a chosen token outside the highlights, pulled up by the NLL
    assert "nll_train/chosen" not in compute_objective(LossSettings(loss=LossType.DPO), stats, 1, "train")[1]


@pytest.mark.parametrize("settings", [{"loss": LossType.DPO, "beta": 0.5, "nll_alpha": 0.5},
                                      {**TDPO2, "kl_weights": "all", "nll_alpha": 0.5}], ids=["dpo", "tdpo2-kl-all"])
def test_nll_alpha_through_every_route(models, tokenizer, tmp_path, settings):
    without = {k: v for k, v in settings.items() if k != "nll_alpha"}
    truth = assert_routes_agree(models, tmp_path, settings, batch_of(tokenizer), differs_from=without)
    assert (truth[1]["nll_train/chosen"] > 0).all()


def test_nll_alpha_key_from_the_command_line():
    for loss in ("dpo", "tdpo"):
        cfg = compose_config([f"loss={loss}", "loss.nll_alpha=0.5"])
        assert LossSettings.from_config(cfg, LossType(loss)).nll_alpha == 0.5
    assert compose_config(["loss=dpo"]).loss.nll_alpha == 0.0
    with pytest.raises(ConfigError, match="nll_alpha"):
        compose_config(["loss=sft", "loss.nll_alpha=0.5"])  # SFT is all NLL already: no such key
    with pytest.raises(ConfigError, match="loss.nll_alpha=-1.0"):
        validate(compose_config(["loss=dpo", "loss.nll_alpha=-1", "debug=true"]))
    assert not _free_on_resume("loss.nll_alpha")


# ---------------------------------------------------------------- granular.sides, granular.after_first_error

# two text tokens and the end token per response: "ab cd" as [(0, 2), (2, 5)], a -1 region on "ab" of the
# rejected response (the chosen one has no region of its own)
OFFSETS = [(0, 2), (2, 5)]
REJECTED_REGION = (Region(0, 2, RegionFlag.INCORRECT),)


def pair_weights(**gran) -> torch.Tensor:
    """(2, 4) margin weights of the hand-made pair: position 0 the prompt, 1..3 the response."""
    from granular_po.data.masks import response_weights

    options = GranularOptions(enabled=True, **gran)
    chosen = response_weights(OFFSETS, 5, (), True, options, "chosen")
    rejected = response_weights(OFFSETS, 5, REJECTED_REGION, True, options, "rejected")
    return torch.tensor([[0.0, *chosen], [0.0, *rejected]], dtype=torch.float64)


def dpo_by_hand(weights: torch.Tensor) -> tuple[float, torch.Tensor]:
    """L = -log sigma(beta (m_c - m_r)), m = sum_t w_t (log p(y_t) - log p_ref(y_t));
    dL/dz_t = -/+ beta sigma(-beta d) w_t (onehot - p) (chosen / rejected)."""
    margins = [sum(float(weights[row, t]) * (by_hand(row, t)[0] - by_hand(row, t)[1]) for t in (1, 2, 3))
               for row in (0, 1)]
    d = margins[0] - margins[1]
    dldm = -BETA / (1 + math.exp(BETA * d))
    grad = torch.zeros_like(POLICY_Z)
    for row, sign in ((0, 1.0), (1, -1.0)):
        for t in (1, 2, 3):
            p = by_hand(row, t)[3]
            for v in range(3):
                grad[row, t - 1, v] = sign * dldm * float(weights[row, t]) * ((v == int(IDS[row, t])) - p[v])
    return -math.log(1 / (1 + math.exp(-BETA * d))), grad


def dpo_through_stats(weights: torch.Tensor, impl: str) -> tuple[float, torch.Tensor]:
    z = POLICY_Z.clone().requires_grad_(True)
    stats = compute_token_stats(None, None, None, None, IDS, weights, policy_logits=z, ref_logits=REF_Z,
                                impl=impl, chunk_size=2)
    losses, _ = compute_objective(LossSettings(loss=LossType.DPO, beta=BETA), stats, 1, "train")
    losses.sum().backward()
    return losses.item(), z.grad


SIDES = {  # sides: (chosen weights, rejected weights) at positions 1..3, end token last
    "both": ([0.0, 0.0, 0.0], [1.0, 0.5, 1.0]),  # today: the chosen response has no region, so 0 throughout
    "rejected": ([1.0, 1.0, 1.0], [1.0, 0.5, 1.0]),  # cDPO: the chosen response whole
    "chosen": ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]),  # the rejected response whole
}


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("sides", list(SIDES))
def test_sides_closed_form_weights_loss_and_gradient(sides, impl):
    weights = pair_weights(sides=sides, outside_weight=0.5)
    chosen, rejected = SIDES[sides]
    assert weights.tolist() == [[0.0, *chosen], [0.0, *rejected]]
    expected, expected_grad = dpo_by_hand(weights)
    loss, grad = dpo_through_stats(weights, impl)
    assert loss == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    assert (grad[0].abs().sum() > 0) == (sides == "rejected")  # only then does the chosen response learn


def test_sides_through_every_route(models, tokenizer, tmp_path):
    batch = batch_of(tokenizer, sides="rejected")
    default = batch_of(tokenizer)
    n = default["index"].shape[0]
    # the chosen rows weigh every response token 1; the rejected rows keep their highlights
    torch.testing.assert_close(batch["loss_weights"][:n], default["response_mask"][:n].float())
    torch.testing.assert_close(batch["loss_weights"][n:], default["loss_weights"][n:])
    truth = assert_routes_agree(models, tmp_path, TDPO2, batch)
    assert abs(truth[0].item() - route_run(models, tmp_path, "naive", TDPO2, default)[0].item()) > 1e-4


def test_sides_key_and_sft_weights():
    cfg = compose_config(["loss=dpo", "granular=true", "granular.sides=rejected"])
    assert cfg.granular.sides == "rejected"
    with pytest.raises(ConfigError, match="granular.sides='left'"):
        compose_config(["granular.sides=left"])
    assert not _free_on_resume("granular.sides")
    from granular_po.data.masks import response_weights

    sft = response_weights(OFFSETS, 5, (Region(0, 2, RegionFlag.CORRECT),), True,
                           GranularOptions(enabled=True, sides="rejected"))  # no side: SFT's weights
    assert sft == [1.0, 0.0, 1.0]


AFTER_FIRST_ERROR = {  # (sides, after_first_error): rejected weights at positions 1..3 (end token last)
    ("both", "keep"): [1.0, 0.5, 1.0],
    ("both", "drop"): [1.0, 0.0, 0.0],  # "cd" and the end token follow the error "ab"
    ("chosen", "drop"): [1.0, 0.0, 0.0],  # the rejected response whole up to its first error
}


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("case", list(AFTER_FIRST_ERROR), ids="-".join)
def test_after_first_error_closed_form_weights_loss_and_gradient(case, impl):
    sides, after = case
    weights = pair_weights(sides=sides, after_first_error=after, outside_weight=0.5)
    assert weights[1, 1:].tolist() == AFTER_FIRST_ERROR[case]
    assert weights[0, 1:].tolist() == SIDES[sides][0]  # the chosen response is never cut
    expected, expected_grad = dpo_by_hand(weights)
    loss, grad = dpo_through_stats(weights, impl)
    assert loss == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    # positions 2..3 of the rejected row are predicted from logits 1..2: no gradient once dropped
    assert (grad[1, 1:3].abs().sum() == 0) == (after == "drop")


def test_after_first_error_on_encoded_records():
    """The first region by position, not by order in the record; later regions are cut with the rest."""
    from granular_po.data.masks import response_weights

    offsets = [(0, 2), (2, 5), (5, 8), (8, 11)]  # "ab cd ef gh"
    regions = (Region(6, 8, RegionFlag.INCORRECT), Region(3, 5, RegionFlag.INCORRECT))
    drop = GranularOptions(enabled=True, outside_weight=0.25, after_first_error="drop")
    assert response_weights(offsets, 11, regions, True, drop, "rejected") == [0.25, 1.0, 0.0, 0.0, 0.0]
    assert response_weights(offsets, 11, (), True, drop, "rejected") == [0.0] * 5  # no region: nothing to cut
    assert response_weights(offsets, 11, regions, True, GranularOptions(enabled=True, outside_weight=0.25),
                            "rejected") == [0.25, 1.0, 1.0, 0.25, 1.0]
    assert response_weights(offsets, 11, regions, True, GranularOptions(after_first_error="drop"),
                            "rejected") == [1.0] * 5  # granular off: every token 1


def test_after_first_error_through_every_route(models, tokenizer, tmp_path):
    batch = batch_of(tokenizer, after_first_error="drop", outside_weight=0.25)
    keep = batch_of(tokenizer, outside_weight=0.25)
    n = keep["index"].shape[0]
    torch.testing.assert_close(batch["loss_weights"][:n], keep["loss_weights"][:n])
    assert batch["loss_weights"][n:].sum() < keep["loss_weights"][n:].sum()
    truth = assert_routes_agree(models, tmp_path, {**TDPO2, "kl_weights": "all"}, batch)
    other = route_run(models, tmp_path, "naive", {**TDPO2, "kl_weights": "all"}, keep)
    assert abs(truth[0].item() - other[0].item()) > 1e-4


def test_after_first_error_key():
    cfg = compose_config(["loss=tdpo", "granular=true", "granular.after_first_error=drop"])
    assert cfg.granular.after_first_error == "drop"
    with pytest.raises(ConfigError, match="granular.after_first_error='cut'"):
        compose_config(["granular.after_first_error=cut"])
    assert not _free_on_resume("granular.after_first_error")
