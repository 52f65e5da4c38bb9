"""TinyFusion's learnable N:M depth search with TinySR's DIA and ECS (compress.prune.depth_learnable)."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from compress.prune.depth import DepthDecision
from compress.prune.depth_learnable import (
    DIA_OUTCOMES,
    dia_mix,
    ecs_candidates,
    final_kept,
    group_options,
    keep_probabilities,
    learnable_decision,
    neighbour_option,
    resolve_nm,
    sample_block_mask,
)


def state_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def reference_student():
    from compress.models.resolve import load_model
    from compress.prune.conditioning import precache

    return precache(load_model(None).model)


def tiny_student():
    from compress.models.resolve import load_model
    from compress.prune.conditioning import precache

    return precache(load_model("preset:tiny").model)


# -- options, marginals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "m"), [(1, 2), (2, 4), (3, 4), (4, 8)])
def test_options_enumerate_every_n_of_m(n, m):
    options = group_options(n, m)
    assert options.shape == (math.comb(m, n), m)
    assert torch.all(options.sum(1) == n)
    assert len({tuple(row.tolist()) for row in options}) == options.shape[0]


def test_keep_probabilities_shape_and_sums():
    options = group_options(2, 4)
    logits = torch.randn(3, options.shape[0], generator=torch.Generator().manual_seed(0))
    pi = keep_probabilities(logits, options, scaling=5.0)
    assert pi.shape == (12,)
    assert torch.all((pi >= 0) & (pi <= 1))
    assert torch.allclose(pi.view(3, 4).sum(1), torch.full((3,), 2.0))
    uniform = keep_probabilities(torch.full((2, 6), 0.02), options, scaling=100.0)
    assert torch.allclose(uniform, torch.full((8,), 0.5))


# -- ECS and DIA -------------------------------------------------------------------------------------------


def test_ecs_candidates_for_a_known_case():
    options = group_options(2, 4)  # rows: (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0])
    logits = torch.tensor([9.0, 0.1, 0.2, 0.5, 0.3, 5.0])  # (0,1) is m itself, (2,3) shares nothing
    hat = neighbour_option(mask, logits, options)
    assert hat.tolist() == [0.0, 1.0, 1.0, 0.0]  # (1,2): the best option sharing exactly one layer
    corroded, expanded = ecs_candidates(mask, hat)
    assert corroded.tolist() == [0.0, 1.0, 0.0, 0.0]
    assert expanded.tolist() == [1.0, 1.0, 1.0, 0.0]
    # 1:2 groups share no layer with another option: m̂ is the other option, m⁻ keeps none, m⁺ both.
    hat_12 = neighbour_option(torch.tensor([0.0, 1.0]), torch.zeros(2), group_options(1, 2))
    assert [t.tolist() for t in ecs_candidates(torch.tensor([0.0, 1.0]), hat_12)] == [[0.0, 0.0], [1.0, 1.0]]


@pytest.mark.parametrize(("n", "m"), [(1, 2), (2, 4), (3, 4)])
def test_dia_outcomes_preserve_the_pair_total(n, m):
    options = group_options(n, m)
    logits = torch.randn(2, options.shape[0], generator=torch.Generator().manual_seed(1))
    first, second = options[0], options[-1]
    triples = []
    for mask, row in ((first, logits[0]), (second, logits[1])):
        corroded, expanded = ecs_candidates(mask, neighbour_option(mask, row, options))
        assert corroded.sum() == n - 1 and expanded.sum() == n + 1
        assert torch.all(corroded <= mask) and torch.all(mask <= expanded)
        triples.append((corroded, mask, expanded))
    counts = []
    for outcome in range(len(DIA_OUTCOMES)):
        q = torch.nn.functional.one_hot(torch.tensor(outcome), 3).float()
        a, b = dia_mix(triples[0], triples[1], q)
        assert float(a.sum() + b.sum()) == 2 * n
        counts.append((int(a.sum()), int(b.sum())))
    assert counts == [(n - 1, n + 1), (n, n), (n + 1, n - 1)]


def test_sampled_masks_are_binary_keep_totals_and_pass_gradients():
    options = group_options(2, 4)
    gates = torch.nn.Parameter(torch.full((3, 6), 0.02))  # 3 groups: one pair and an unpaired last group
    pairs = torch.nn.Parameter(torch.full((1, 3), 0.02))
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(30):
        mask = sample_block_mask(gates, pairs, options, tau=1.0, scaling=100.0, generator=generator).detach()
        assert mask.shape == (12,)
        assert set(mask.detach().tolist()) <= {0.0, 1.0}
        assert float(mask[:8].sum()) == 4 and float(mask[8:].sum()) == 2
        seen.add((int(mask[:4].sum()), int(mask[4:8].sum())))
    assert seen == {(1, 3), (2, 2), (3, 1)}
    weights = torch.arange(12.0)
    (sample_block_mask(gates, pairs, options, 1.0, 100.0, generator) * weights).sum().backward()
    assert gates.grad is not None and gates.grad.abs().sum() > 0
    assert pairs.grad is not None and pairs.grad.abs().sum() > 0


def test_final_decision_applies_the_dia_outcome_by_pi_rank():
    options = group_options(2, 4)
    gates = torch.zeros(2, 6)
    gates[0, 0] = 1.0  # group 0 -> blocks (0, 1), with block 1 the more likely of the two
    gates[0, 3] = 0.5  # (1, 2): pi_1 > pi_0, pi_2 the best outside
    gates[1, 5] = 1.0  # group 1 -> blocks (6, 7)
    gates[1, 4] = 0.3  # (5, 7): pi_7 > pi_6, so corrosion drops block 6
    pairs = torch.tensor([[0.0, 0.0, 1.0]])  # expand first, corrode second
    kept, pi, dia, outcomes = final_kept(gates, pairs, options, scaling=5.0)
    assert outcomes == ["expand_first_corrode_second"]
    assert kept == sorted(kept) and len(kept) == 4
    first = [i for i in kept if i < 4]
    second = [i for i in kept if i >= 4]
    assert len(first) == 3 and len(second) == 1
    assert set(first) == {0, 1, 2}  # argmax (0, 1) + the highest-pi removed layer
    assert pi[7] > pi[6] and second == [7]
    assert abs(sum(dia[0]) - 1) < 1e-6


# -- argument checks ---------------------------------------------------------------------------------------


def test_arguments_are_validated_with_useful_messages(reference_student):
    assert resolve_nm(8, 0.5, None, 4) == (2, 4)
    assert resolve_nm(24, 0.25, None, 4) == (3, 4)
    assert resolve_nm(8, None, 1, 2) == (1, 2)
    with pytest.raises(ValueError, match=r"group sizes that divide 8: 2, 4, 8"):
        resolve_nm(8, 0.5, None, 3)
    with pytest.raises(ValueError, match=r"not 1 - N/M.*give N and M explicitly"):
        resolve_nm(8, 0.3, None, 4)
    with pytest.raises(ValueError, match=r"contradicts 3:4"):
        resolve_nm(8, 0.5, 3, 4)
    with pytest.raises(ValueError, match="hr_size"):
        learnable_decision(reference_student, steps=1, hr_size=30)
    with pytest.raises(TypeError, match="CompactSD3Transformer"):
        learnable_decision(torch.nn.Module(), steps=1)


# -- the search --------------------------------------------------------------------------------------------


def test_search_returns_a_valid_decision_leaves_the_student_alone_and_is_deterministic(reference_student):
    before = state_hash(reference_student)
    flags = [p.requires_grad for p in reference_student.parameters()]
    calls = []
    options = {"ratio": 0.5, "seed": 3, "steps": 4, "batch_size": 1, "hr_size": 64, "record_every": 2,
               "progress": calls.append}
    decision = learnable_decision(reference_student, **options)
    assert isinstance(decision, DepthDecision) and decision.method == "learnable"
    assert len(calls) == 4
    assert state_hash(reference_student) == before
    assert [p.requires_grad for p in reference_student.parameters()] == flags
    assert all(p.grad is None for p in reference_student.parameters())
    from compress.models.lora import has_lora

    assert not has_lora(reference_student.transformer)

    details = decision.details
    assert details["nm"] == "2:4" and details["steps"] == 4
    assert details["groups"] == [[0, 1, 2, 3], [4, 5, 6, 7]] and details["pairs"] == [[0, 1]]
    assert decision.kept == sorted(decision.kept) and len(decision.kept) == 4  # N per group, summed
    assert len(decision.scores) == 8 and abs(sum(decision.scores) - 4) < 1e-4
    history = details["keep_probability_history"]
    assert [h["step"] for h in history] == [0, 2, 4]
    for entry in history:
        assert len(entry["pi"]) == 8
        assert abs(sum(entry["pi"][:4]) - 2) < 1e-4 and abs(sum(entry["pi"][4:]) - 2) < 1e-4
    assert history[-1]["pi"] == pytest.approx(decision.scores)
    assert len(details["pair_distributions"]) == 1 and abs(sum(details["pair_distributions"][0]) - 1) < 1e-5
    assert details["schedules"]["tau"] == {"kind": "linear", "start": 4.0, "end": 0.1}
    assert details["schedules"]["scaling"]["start"] == 100.0
    assert details["loss_curve"] and all(math.isfinite(p["loss"]) for p in details["loss_curve"])
    decision.to_json()  # JSON-ready

    again = learnable_decision(reference_student, **{**options, "progress": None})
    assert again.kept == decision.kept
    assert again.scores == decision.scores
    assert again.details["pair_distributions"] == details["pair_distributions"]
    assert [p["loss"] for p in again.details["loss_curve"]] == [p["loss"] for p in details["loss_curve"]]


def test_gates_learn_to_drop_a_block_that_does_nothing():
    """Block 1 of the tiny student is made an identity (zero output projections): removing it costs nothing,
    removing any other moves the output, so its keep probability must fall and it must not be kept."""
    student = tiny_student()
    block = student.transformer.transformer_blocks[1]
    with torch.no_grad():
        for layer in (block.attn.to_out[0], block.ff.net[2], block.attn.to_add_out, block.ff_context.net[2]):
            layer.weight.zero_()
            layer.bias.zero_()
    decision = learnable_decision(student, ratio=0.5, seed=0, steps=40, record_every=10, perceptual_weight=0.0)
    pi = decision.scores
    assert decision.details["keep_probability_history"][0]["pi"] == pytest.approx([0.5] * 4)
    assert pi[1] < 0.4 and pi[1] == min(pi)
    assert 1 not in decision.kept
    assert decision.details["gate_logits"][0] != pytest.approx([0.02] * 6)
    assert "perceptual_weight = 0" in decision.details["loss"]["perceptual"]
