"""core.losses: closed-form values, float64 gradcheck for every loss, and parity with TRL's own code."""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from rlhflab.core.losses import (
    DPO_LOSSES,
    bradley_terry_loss,
    dpo_loss,
    get_dpo_loss,
    log1mexp,
    log_odds_ratio,
    orpo_loss,
    simpo_loss,
)

LN2 = math.log(2)
ALL_TYPES = sorted(DPO_LOSSES)
# label_smoothing each loss type is exercised with (exo_pair needs > 0, robust < 0.5)
SMOOTHING = {"exo_pair": 1e-3, "robust": 0.1}


def zeros(n: int = 3) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float64)


def random_logps(n: int, seed: int, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [-10 * torch.rand(n, generator=g, dtype=dtype) for _ in range(4)]


# ---- closed forms ------------------------------------------------------------------------------------------

ZERO_LOGRATIO_LOSS = {  # every log-ratio 0, beta = 0.1
    "sigmoid": LN2,
    "hinge": 1.0,
    "ipo": (1 / (2 * 0.1)) ** 2,
    "robust": LN2,
    "exo_pair": 0.5 * (-LN2 - math.log(1 - 1e-3)) + 0.5 * (-LN2 - math.log(1e-3)),
    "nca_pair": 2 * LN2,
    "bco_pair": 2 * LN2,
    "sppo_hard": 2 * (0.5 / 0.1) ** 2,
    "apo_zero": 1.0,
    "apo_down": 1.0,
}


def test_every_registered_loss_has_a_closed_form_check():
    assert set(ZERO_LOGRATIO_LOSS) == set(DPO_LOSSES)


@pytest.mark.parametrize("loss_type", ALL_TYPES)
def test_zero_logratios_closed_form(loss_type):
    policy = torch.full((3,), -5.0, dtype=torch.float64)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy,
        policy - 2,
        policy,
        policy - 2,
        beta=0.1,
        loss_type=loss_type,
        label_smoothing=SMOOTHING.get(loss_type, 0.0),
    )
    torch.testing.assert_close(losses, torch.full((3,), ZERO_LOGRATIO_LOSS[loss_type], dtype=torch.float64))
    assert torch.equal(chosen_rewards, zeros()) and torch.equal(rejected_rewards, zeros())


def test_sigmoid_and_cdpo_at_a_hand_picked_margin():
    # beta = 1, h_c = ln 3, h_r = 0: sigmoid(ln 3) = 3/4
    chosen, rejected = torch.tensor([math.log(3) - 4.0]), torch.tensor([-7.0])
    ref_chosen, ref_rejected = torch.tensor([-4.0]), torch.tensor([-7.0])
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=1.0)
    assert losses.item() == pytest.approx(math.log(4 / 3))
    assert chosen_rewards.item() == pytest.approx(math.log(3)) and rejected_rewards.item() == 0.0
    cdpo, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=1.0, label_smoothing=0.25)
    assert cdpo.item() == pytest.approx(0.75 * math.log(4 / 3) + 0.25 * math.log(4))


def test_rewards_are_beta_times_logratios_and_detached():
    pc, pr, rc, rr = (t.requires_grad_() for t in random_logps(5, seed=1))
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.3)
    assert losses.requires_grad and not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    torch.testing.assert_close(chosen_rewards, 0.3 * (pc - rc).detach())
    torch.testing.assert_close(rejected_rewards, 0.3 * (pr - rr).detach())


def test_ipo_length_normalised_by_response_lengths():
    # h_c = 2 over 4 tokens -> 0.5; h_r = -1 over 2 tokens -> -0.5; 0.5 - (-0.5) = 1 = 1 / (2 beta) at beta 0.5
    losses, chosen_rewards, _ = dpo_loss(
        torch.tensor([2.0]),
        torch.tensor([-1.0]),
        zeros(1).float(),
        zeros(1).float(),
        beta=0.5,
        loss_type="ipo",
        chosen_lengths=torch.tensor([4]),
        rejected_lengths=torch.tensor([2]),
    )
    assert losses.item() == pytest.approx(0.0)
    assert chosen_rewards.item() == pytest.approx(1.0)  # rewards stay on the summed log-ratios, as in TRL


def test_bco_delta_shifts_both_rewards():
    losses, _, _ = dpo_loss(
        torch.tensor([1.0]),
        torch.tensor([3.0]),
        torch.tensor([0.0]),
        torch.tensor([0.0]),
        beta=1.0,
        loss_type="bco_pair",
        bco_delta=2.0,
    )
    # -log sigmoid(1 - 2) - log sigmoid(-(3 - 2))
    assert losses.item() == pytest.approx(2 * math.log(1 + math.e))


def test_unknown_loss_type_lists_valid_names():
    with pytest.raises(ValueError, match="sigmoid") as info:
        get_dpo_loss("sigmiod")
    assert all(name in str(info.value) for name in DPO_LOSSES)
    with pytest.raises(ValueError):
        dpo_loss(zeros(), zeros(), zeros(), zeros(), loss_type="nope")


def test_smoothing_ranges_are_checked():
    with pytest.raises(ValueError):
        dpo_loss(zeros(), zeros(), zeros(), zeros(), loss_type="exo_pair")
    with pytest.raises(ValueError):
        dpo_loss(zeros(), zeros(), zeros(), zeros(), loss_type="robust", label_smoothing=0.5)


def test_simpo_closed_form():
    # beta (a_c - a_r) = gamma -> the margin is used up exactly: ln 2
    losses, chosen_rewards, rejected_rewards = simpo_loss(
        torch.tensor([-1.0]), torch.tensor([-1.25]), beta=2.0, gamma=0.5
    )
    assert losses.item() == pytest.approx(LN2)
    assert chosen_rewards.item() == pytest.approx(-2.0) and rejected_rewards.item() == pytest.approx(-2.5)


def test_log_odds_ratio_and_orpo_closed_form():
    # P = 1/2 (odds 1) vs P = 1/4 (odds 1/3): log odds ratio = log 3
    a_c, a_r = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert log_odds_ratio(a_c, a_r).item() == pytest.approx(math.log(3))
    losses, _, _ = orpo_loss(a_c, a_r, beta=0.1)
    assert losses.item() == pytest.approx(-0.1 * math.log(3 / 4))
    equal, _, _ = orpo_loss(a_c, a_c, beta=0.1)
    assert equal.item() == pytest.approx(0.1 * LN2)


def test_log1mexp_is_accurate_at_both_ends():
    x = torch.tensor([-1e-10, -0.5, -0.7, -50.0], dtype=torch.float64)
    expected = torch.tensor(
        [math.log(1e-10), math.log(1 - math.exp(-0.5)), math.log(1 - math.exp(-0.7)), -math.exp(-50)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(log1mexp(x), expected, rtol=1e-9, atol=0)


def test_bradley_terry_closed_form():
    chosen, rejected = torch.tensor([0.0, math.log(3) + 1]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), torch.tensor([LN2, math.log(4 / 3)]))
    with_margin = bradley_terry_loss(chosen, rejected, margin=torch.tensor([0.0, math.log(3)]))
    torch.testing.assert_close(with_margin, torch.tensor([LN2, LN2]))


# ---- gradients ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ALL_TYPES)
def test_gradcheck_every_dpo_loss(loss_type):
    inputs = tuple(t.requires_grad_() for t in random_logps(4, seed=2))
    smoothing = SMOOTHING.get(loss_type, 0.0)

    def f(pc, pr, rc, rr):
        return dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type, label_smoothing=smoothing)[0]

    assert torch.autograd.gradcheck(f, inputs)


def test_gradcheck_ipo_with_lengths_simpo_orpo_bradley_terry():
    pc, pr, rc, rr = (t.requires_grad_() for t in random_logps(4, seed=3))
    lengths = torch.tensor([3, 5, 1, 8])
    assert torch.autograd.gradcheck(
        lambda *x: dpo_loss(*x, loss_type="ipo", chosen_lengths=lengths, rejected_lengths=lengths + 1)[0],
        (pc, pr, rc, rr),
    )
    a_c, a_r = (pc / 10).detach().requires_grad_(), (pr / 10).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: simpo_loss(a, b)[0], (a_c, a_r))
    assert torch.autograd.gradcheck(lambda a, b: orpo_loss(a, b)[0], (a_c, a_r))
    assert torch.autograd.gradcheck(bradley_terry_loss, (pc, pr))


# ---- parity with TRL ---------------------------------------------------------------------------------------


def import_or_skip(module: str, name: str):
    """TRL's `module.name`. Skips only when TRL is not installed and CI is not set; a TRL that is installed but
    fails to import (a broken install, a moved module) is an error, so parity can never turn silently into skips."""
    if importlib.util.find_spec("trl") is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI is set but TRL is not installed: the parity tests cannot run (pip install -e '.[parity]')")
        pytest.skip("TRL is not installed (pip install -e '.[parity]')")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, RuntimeError, AttributeError) as error:  # trl imports lazily and wraps ImportError
        pytest.fail(f"TRL is installed but {module}.{name} does not import: {error!r}")


def trl_dpo_per_pair(loss_type, beta, label_smoothing, pc, pr, rc, rr, chosen_len, rejected_len) -> float:
    """TRL 1.16 `DPOTrainer._compute_loss` on one pair: a stand-in trainer and a stand-in model whose
    per-token log-probs sum to the given sequence log-probs; reference log-probs come precomputed."""
    dpo_trainer = import_or_skip("trl.trainer.dpo_trainer", "DPOTrainer")
    length = 12
    completion_mask = torch.zeros(2, length, dtype=torch.long)
    completion_mask[0, length - chosen_len :] = 1
    completion_mask[1, length - rejected_len :] = 1
    log_probs = torch.zeros(2, length - 1, dtype=torch.float32)
    log_probs[0, -1], log_probs[1, -1] = pc, pr
    outputs = SimpleNamespace(
        log_probs=log_probs,
        entropy=torch.zeros(2, length - 1),
        mean_logits=torch.zeros(2, length - 1),
        is_top1=torch.zeros(2, length - 1, dtype=torch.bool),
    )
    model = SimpleNamespace(training=False)
    model_fn = lambda **kwargs: outputs  # noqa: E731
    model_fn.training = False
    trainer = SimpleNamespace(
        model=model,
        accelerator=SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        args=SimpleNamespace(discopop_tau=0.05),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(2, length, dtype=torch.long),
        "attention_mask": torch.ones(2, length, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": torch.tensor([rc]),
        "ref_rejected_logps": torch.tensor([rr]),
    }
    loss = dpo_trainer._compute_loss(trainer, model_fn, inputs, return_outputs=False)
    assert trainer._metrics["eval"]["rewards/chosen"][0] == pytest.approx(
        beta * (pc - rc), rel=1e-5, abs=1e-6
    )
    return loss.item()


@pytest.mark.parametrize("loss_type", ALL_TYPES)
def test_dpo_losses_match_trl(loss_type):
    smoothing = SMOOTHING.get(loss_type, 0.0)
    pc, pr, rc, rr = random_logps(8, seed=4, dtype=torch.float32)
    chosen_lengths = torch.randint(1, 10, (8,), generator=torch.Generator().manual_seed(5))
    rejected_lengths = torch.randint(1, 10, (8,), generator=torch.Generator().manual_seed(6))
    ours, _, _ = dpo_loss(
        pc,
        pr,
        rc,
        rr,
        beta=0.1,
        loss_type=loss_type,
        label_smoothing=smoothing,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    theirs = [
        trl_dpo_per_pair(
            loss_type,
            0.1,
            smoothing,
            pc[i].item(),
            pr[i].item(),
            rc[i].item(),
            rr[i].item(),
            int(chosen_lengths[i]),
            int(rejected_lengths[i]),
        )
        for i in range(8)
    ]
    torch.testing.assert_close(ours, torch.tensor(theirs), rtol=1e-6, atol=1e-6)


def test_simpo_matches_trl_cpo_simpo():
    cpo_trainer = import_or_skip("trl.experimental.cpo.cpo_trainer", "CPOTrainer")
    a_c, a_r, _, _ = (t / 10 for t in random_logps(8, seed=7, dtype=torch.float32))
    for label_smoothing in (0.0, 0.1):
        stand_in = SimpleNamespace(
            alpha=0.0,
            beta=2.0,
            simpo_gamma=0.5,
            loss_type="simpo",
            label_smoothing=label_smoothing,
            accelerator=SimpleNamespace(device="cpu"),
        )
        theirs = cpo_trainer.cpo_loss(stand_in, a_c, a_r)
        ours = simpo_loss(a_c, a_r, beta=2.0, gamma=0.5, label_smoothing=label_smoothing)
        for mine, trl in zip(ours, theirs, strict=True):
            torch.testing.assert_close(mine, trl, rtol=1e-6, atol=1e-6)


def test_orpo_matches_trl_odds_ratio_loss():
    orpo_trainer = import_or_skip("trl.experimental.orpo.orpo_trainer", "ORPOTrainer")
    a_c, a_r, _, _ = (t / 10 for t in random_logps(8, seed=8, dtype=torch.float32))
    stand_in = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device="cpu"))
    theirs, trl_chosen, trl_rejected, _, _ = orpo_trainer.odds_ratio_loss(stand_in, a_c, a_r)
    ours, chosen_rewards, rejected_rewards = orpo_loss(a_c, a_r, beta=0.1)
    torch.testing.assert_close(ours, -theirs, rtol=1e-6, atol=1e-6)  # TRL returns the negated term
    torch.testing.assert_close(chosen_rewards, trl_chosen)
    torch.testing.assert_close(rejected_rewards, trl_rejected)
