"""Loss library of `distill`: TSD-SR (TSD, DASM, fake score), TinySR KD terms, TAD-SR, perceptual loss.

The score-distillation formulas are pinned on hand-written affine velocity models ``v = a * z + b + c(cond) + d t``
(float64) against direct re-computations of the formulas (TSD-SR, Wu et al., CVPR 2025: Eqs. 3-6 and Alg. 1 as
TSD-SR's ``train/train.py`` computes them; TAD-SR Eqs. 7-12), so a wrong sign, weight, model or noise shows up
as a numeric mismatch.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from distill.flow import Conditioning, FlowSchedule, ScoreModel, cfg_velocity
from distill.losses import (
    TSDConfig,
    dasm_indices,
    fake_score_loss,
    feature_kd_loss,
    hinge_d_loss,
    hinge_g_loss,
    latent_l1,
    latent_mse,
    tsd_gradient,
    tsd_loss,
)
from distill.perceptual import build_perceptual_loss, lpips_missing_files
from distill.tadsr import (
    SMALL_INDEX_RANGE,
    TimeAwareDiscriminator,
    TimeConditionedHead,
    discriminator_inputs,
    hf_score_distillation_gradient,
    hf_score_distillation_loss,
    sample_small_indices,
)

SHAPE = (2, 3, 4, 5)
DT = torch.float64


# ----------------------------------------------------------------------------------------------------------------
# toy models and helpers
# ----------------------------------------------------------------------------------------------------------------


class Affine:
    """v = a * z + b + cond_gain * mean(pooled) + t_gain * t/1000, recording its calls."""

    def __init__(self, a, b=0.0, cond_gain=0.0, t_gain=0.0):
        self.a = torch.as_tensor(a, dtype=DT)
        self.b = torch.as_tensor(b, dtype=DT)
        self.cond_gain = cond_gain
        self.t_gain = t_gain
        self.calls = []

    def __call__(self, z, t, cond):
        self.calls.append((z.shape[0], t.clone(), cond))
        c = cond.pooled.to(DT).mean(dim=1).reshape(-1, 1, 1, 1)
        return self.a * z + self.b + self.cond_gain * c + self.t_gain * (t.to(DT) / 1000).reshape(-1, 1, 1, 1)


def channel_gain(*values):
    return torch.tensor(values, dtype=DT).reshape(1, -1, 1, 1)


def conditioning(value: float, batch: int = 1) -> Conditioning:
    return Conditioning(torch.full((batch, 3, 6), value, dtype=DT), torch.full((batch, 4), value, dtype=DT))


COND, UNCOND = conditioning(1.5), conditioning(-0.25)


def manual_cfg(fn, z, t, cond, uncond, g):
    batch = z.shape[0]
    v_c = fn(z, t, cond.expand(batch))
    v_u = fn(z, t, uncond.expand(batch))
    return v_u + g * (v_c - v_u)


def latents(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g, dtype=DT) for _ in range(3)]


@pytest.fixture(scope="module")
def schedule():
    return FlowSchedule()


def teacher_model():
    return Affine(channel_gain(0.5, -0.3, 0.8), b=0.1, cond_gain=0.7, t_gain=0.4)


def fake_model():
    return Affine(channel_gain(-0.2, 0.6, 0.1), b=-0.3, cond_gain=-0.4, t_gain=0.9)


def reference_tsd(student, hr, noise, idx_list, schedule, teacher, fake, lam, g, weights, move_models=None):
    """Direct re-computation of TSD (TSD-SR Eqs. 3-5) with DASM (Eq. 6) for one index list shared by the batch."""
    move_hat, move_real = move_models or (fake, teacher)
    sig = [schedule.sigmas[i].item() for i in idx_list]
    z_hat = (1 - sig[0]) * student + sig[0] * noise
    z_real = (1 - sig[0]) * hr + sig[0] * noise
    grad = torch.zeros_like(student)
    for k, w in enumerate(weights):
        t = torch.full((student.shape[0],), schedule.timesteps[idx_list[k]].item(), dtype=torch.float32)
        vt_hat = manual_cfg(teacher, z_hat, t, COND, UNCOND, g)
        vf_hat = manual_cfg(fake, z_hat, t, COND, UNCOND, g)
        vt_real = manual_cfg(teacher, z_real, t, COND, UNCOND, g)
        grad += w * sig[k] ** 2 * (lam * (vt_hat - vf_hat) + (1 - lam) * (vt_hat - vt_real))
        if k + 1 < len(weights):
            mh = manual_cfg(move_hat, z_hat, t, COND, UNCOND, g)
            mr = manual_cfg(move_real, z_real, t, COND, UNCOND, g)
            z_hat = z_hat - (sig[k] - sig[k + 1]) * mh
            z_real = z_real - (sig[k] - sig[k + 1]) * mr
    return grad


# ----------------------------------------------------------------------------------------------------------------
# flow.py
# ----------------------------------------------------------------------------------------------------------------


def test_schedule_matches_diffusers_and_pinned_values(schedule):
    from diffusers import FlowMatchEulerDiscreteScheduler

    reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    assert schedule.timesteps.shape == schedule.sigmas.shape == (1000,)
    assert schedule.timesteps.dtype == torch.float32
    torch.testing.assert_close(schedule.timesteps, reference.timesteps.float())
    torch.testing.assert_close(schedule.sigmas, reference.sigmas[:1000].float())
    # TSD-SR train.py: randint(50, 950) on the shift-3 schedule spans sigma in [0.139, 0.983].
    assert schedule.sigma(50).item() == pytest.approx(0.982759, abs=1e-5)
    assert schedule.sigma(949).item() == pytest.approx(0.138838, abs=1e-5)
    assert schedule.sigma(0).item() == pytest.approx(1.0)
    assert schedule.sigma(999).item() == pytest.approx(0.002994, abs=1e-6)
    assert schedule.timestep(0).item() == pytest.approx(1000.0)
    # Shift-3 convention: sigma_i = 3 s / (1 + 2 s), s = (1000 - i) / 1000; t = 1000 sigma; strictly descending.
    s = (1000 - torch.arange(1000, dtype=DT)) / 1000
    torch.testing.assert_close(schedule.sigmas.to(DT), 3 * s / (1 + 2 * s), atol=1e-6, rtol=0)
    torch.testing.assert_close(schedule.timesteps, schedule.sigmas * 1000, atol=1e-3, rtol=0)
    assert bool((schedule.sigmas[1:] < schedule.sigmas[:-1]).all())
    with pytest.raises(IndexError):
        schedule.sigma(1000)


def test_sample_indices_range_and_reproducibility(schedule):
    draws = schedule.sample_indices(20000, torch.Generator().manual_seed(0))
    assert draws.dtype == torch.long and draws.shape == (20000,)
    assert int(draws.min()) == 50 and int(draws.max()) == 949  # [low, high), like randint(50, 950)
    again = schedule.sample_indices(20000, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    small = schedule.sample_indices(500, torch.Generator().manual_seed(1), low=10, high=12)
    assert set(small.tolist()) == {10, 11}
    with pytest.raises(ValueError):
        schedule.sample_indices(2, None, low=5, high=5)


def test_add_noise_and_predict_x0_invert_each_other(schedule):
    z0, noise, _ = latents(0)
    sigma = schedule.sigma(torch.tensor([100, 900])).to(DT)
    z_t = FlowSchedule.add_noise(z0, noise, sigma)
    torch.testing.assert_close(z_t[0], (1 - sigma[0]) * z0[0] + sigma[0] * noise[0])
    torch.testing.assert_close(z_t[1], (1 - sigma[1]) * z0[1] + sigma[1] * noise[1])
    # The exact velocity eps - z0 recovers z0.
    torch.testing.assert_close(FlowSchedule.predict_x0(z_t, noise - z0, sigma), z0)


def test_conditioning_expand():
    cond = conditioning(1.0)
    expanded = cond.expand(3)
    assert expanded.prompt_embeds.shape == (3, 3, 6) and expanded.pooled.shape == (3, 4)
    three = conditioning(1.0, batch=3)
    assert three.expand(3) is three
    with pytest.raises(ValueError):
        three.expand(2)
    with pytest.raises(ValueError):
        Conditioning(torch.zeros(2, 3, 6), torch.zeros(1, 4))


@pytest.mark.parametrize("batched", [True, False])
def test_cfg_velocity_arithmetic(batched):
    model = Affine(0.5, cond_gain=2.0)
    z, _, _ = latents(1)
    t = torch.tensor([500.0, 20.0])
    v = cfg_velocity(model, z, t, COND, UNCOND, 7.5, batched=batched)
    v_c = 0.5 * z + 2.0 * 1.5
    v_u = 0.5 * z + 2.0 * -0.25
    torch.testing.assert_close(v, v_u + 7.5 * (v_c - v_u))
    assert len(model.calls) == (1 if batched else 2)

    model.calls.clear()
    single = cfg_velocity(model, z, t, COND, UNCOND, 1.0)
    assert len(model.calls) == 1 and model.calls[0][2].pooled[0, 0].item() == 1.5  # one *conditional* call
    torch.testing.assert_close(single, v_c)


def test_score_model_wraps_sd3(tiny_parts):
    transformer, prompt, pooled = tiny_parts
    fn = ScoreModel(transformer)
    z = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1000.0, 300.0])
    with torch.no_grad():
        got = fn(z, t, Conditioning(prompt, pooled))
        want = transformer(
            hidden_states=z,
            timestep=t,
            encoder_hidden_states=prompt.expand(2, -1, -1),
            pooled_projections=pooled.expand(2, -1),
            return_dict=False,
        )[0]
        scalar = fn(z, 300.0, Conditioning(prompt, pooled))  # one scalar timestep for the whole batch
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(scalar[1], want[1])
    assert not torch.allclose(scalar[0], want[0])


# ----------------------------------------------------------------------------------------------------------------
# TSD gradient and loss
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [1.0, 0.0, 0.7])
def test_tsd_gradient_matches_formula(schedule, lam):
    student, hr, noise = latents(2)
    teacher, fake = teacher_model(), fake_model()
    config = TSDConfig(vsd_weight=lam)
    got = tsd_gradient(student, hr, noise, 300, schedule, teacher, fake, COND, UNCOND, config)
    want = reference_tsd(student, hr, noise, [300], schedule, teacher, fake, lam, 7.5, [1.0])
    torch.testing.assert_close(got, want)
    assert got.abs().max() > 1e-3  # non-trivial


def test_tsd_mix_is_linear_combination_of_vsd_and_tsm(schedule):
    student, hr, noise = latents(3)
    args = (student, hr, noise, 700, schedule, teacher_model(), fake_model(), COND, UNCOND)
    vsd = tsd_gradient(*args, TSDConfig(vsd_weight=1.0))
    tsm = tsd_gradient(*args, TSDConfig(vsd_weight=0.0))
    mix = tsd_gradient(*args, TSDConfig())  # lambda = 0.7 by default
    torch.testing.assert_close(mix, 0.7 * vsd + 0.3 * tsm)
    assert not torch.allclose(vsd, tsm)


def test_tsd_vsd_direction_explicit(schedule):
    """Pure VSD with teacher and fake differing only in a constant bias: grad = sigma^2 * (b_psi - b_phi)."""
    student, hr, noise = latents(4)
    teacher, fake = Affine(0.3, b=0.5), Affine(0.3, b=-0.25)
    for index in (50, 400, 949):
        got = tsd_gradient(student, hr, noise, index, schedule, teacher, fake, COND, UNCOND, TSDConfig(vsd_weight=1.0))
        sigma = schedule.sigmas[index].item()
        torch.testing.assert_close(got, torch.full(SHAPE, sigma**2 * 0.75, dtype=DT))  # sigma^2 weighting


def test_tsd_tsm_uses_same_noise_for_both_branches(schedule):
    """With z == zh the TSM term vanishes only if both are noised with the same eps."""
    student, _, noise = latents(5)
    teacher = teacher_model()
    grad = tsd_gradient(
        student, student.clone(), noise, 500, schedule, teacher, teacher, COND, UNCOND, TSDConfig(vsd_weight=0.0)
    )
    assert torch.count_nonzero(grad) == 0
    # Identical teacher and fake: the VSD term vanishes too, whatever the latents.
    _, hr, _ = latents(6)
    vsd = tsd_gradient(student, hr, noise, 500, schedule, teacher, teacher, COND, UNCOND, TSDConfig(vsd_weight=1.0))
    assert torch.count_nonzero(vsd) == 0
    # TSM for an affine teacher: sigma^2 * a_cfg * (1 - sigma) * (zh - z), with a_cfg = a (a has no cond part).
    tsm = tsd_gradient(student, hr, noise, 500, schedule, teacher, teacher, COND, UNCOND, TSDConfig(vsd_weight=0.0))
    sigma = schedule.sigmas[500].item()
    torch.testing.assert_close(tsm, sigma**2 * teacher.a * (1 - sigma) * (student - hr))


def test_tsd_zeroes_nan(schedule):
    student, hr, noise = latents(7)

    def nan_fake(z, t, cond):
        v = 0.2 * z
        v[:, 0] = float("nan")
        return v

    grad = tsd_gradient(student, hr, noise, 200, schedule, teacher_model(), nan_fake, COND, UNCOND, TSDConfig())
    assert torch.isfinite(grad).all()
    assert torch.count_nonzero(grad[:, 0]) == 0 and torch.count_nonzero(grad[:, 1:]) == grad[:, 1:].numel()


def test_tsd_loss_injects_grad_over_numel():
    student = torch.randn(SHAPE, dtype=DT, requires_grad=True)
    grad = torch.randn(SHAPE, dtype=DT)
    loss = tsd_loss(student, grad)
    loss.backward()
    torch.testing.assert_close(student.grad, grad / grad.numel())
    assert loss.item() == pytest.approx(0.5 * (grad**2).mean().item())


def test_tsd_per_sample_indices_match_single_index_runs(schedule):
    student, hr, noise = latents(8)
    args = (schedule, teacher_model(), fake_model(), COND, UNCOND, TSDConfig())
    both = tsd_gradient(student, hr, noise, torch.tensor([100, 800]), *args)
    first = tsd_gradient(student[:1], hr[:1], noise[:1], 100, *args)
    second = tsd_gradient(student[1:], hr[1:], noise[1:], 800, *args)
    torch.testing.assert_close(both, torch.cat([first, second]))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("vsd_weight", 1.5),
        ("vsd_weight", -0.1),
        ("guidance", -1.0),
        ("index_low", 960),
        ("index_high", 1001),
        ("dasm_points", 0),
        ("dasm_step", 0),
        ("dasm_weights", (1.0, 0.3)),
        ("dasm_random_bias", -1),
        ("dasm_random_bias", 200),
    ],
)
def test_tsd_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field.split("_")[0]):
        TSDConfig(**{field: value})
    TSDConfig()  # defaults are valid


def test_tsd_config_defaults_follow_tsdsr_train_script():
    config = TSDConfig()
    assert (config.vsd_weight, config.guidance, config.index_low, config.index_high) == (0.7, 7.5, 50, 950)
    assert (config.dasm, config.dasm_points, config.dasm_step, config.dasm_random_bias) == (False, 4, 50, 25)
    assert config.dasm_weights == (1.0, 0.3, 0.3, 0.3)


# ----------------------------------------------------------------------------------------------------------------
# DASM
# ----------------------------------------------------------------------------------------------------------------


def test_dasm_point_placement(schedule):
    assert dasm_indices(300, TSDConfig(), None) == [300]  # DASM off: the sampled point only
    config = TSDConfig(dasm=True)
    generator = torch.Generator().manual_seed(0)
    biases = set()
    for _ in range(2000):
        points = dasm_indices(300, config, generator)
        assert len(points) == config.dasm_points + 1 and points[0] == 300
        steps = [b - a for a, b in itertools.pairwise(points)]
        assert all(43 <= s <= 57 for s in steps), points  # about 50 indices each, (200 +- 25) / 4
        sigmas = schedule.sigma(torch.tensor(points))
        assert bool((sigmas[1:] < sigmas[:-1]).all())  # monotone towards lower noise
        biases.add(points[-1] - 300 - 200)
    assert biases == set(range(-25, 26))  # b uniform on the integers [-25, 25]
    # Clamp at the last index: 949 + 200 - 25 > 999.
    for _ in range(50):
        points = dasm_indices(949, config, generator)
        assert points[-1] == 999 and points[0] == 949 and points == sorted(points)
    # No bias: exact linspace, and the generator is not consumed.
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    assert dasm_indices(100, TSDConfig(dasm=True, dasm_random_bias=0), generator) == [100, 150, 200, 250, 300]
    assert torch.equal(generator.get_state(), state)
    assert dasm_indices(120, TSDConfig(dasm=True, dasm_points=2, dasm_weights=(1, 1), dasm_random_bias=0)) == [
        120,
        170,
        220,
    ]


def test_dasm_gradient_weights_and_euler_moves(schedule):
    student, hr, noise = latents(9)
    teacher, fake = teacher_model(), fake_model()
    config = TSDConfig(dasm=True)
    got = tsd_gradient(
        student, hr, noise, 400, schedule, teacher, fake, COND, UNCOND, config, torch.Generator().manual_seed(11)
    )
    idx = dasm_indices(400, config, torch.Generator().manual_seed(11))
    want = reference_tsd(student, hr, noise, idx, schedule, teacher, fake, 0.7, 7.5, [1.0, 0.3, 0.3, 0.3])
    torch.testing.assert_close(got, want)
    # The test can tell the models apart: moving zh with the teacher and z with the fake gives another number.
    swapped = reference_tsd(
        student, hr, noise, idx, schedule, teacher, fake, 0.7, 7.5, [1.0, 0.3, 0.3, 0.3], move_models=(teacher, fake)
    )
    assert not torch.allclose(got, swapped, atol=1e-6)
    # Wrong weights would also show.
    flat = reference_tsd(student, hr, noise, idx, schedule, teacher, fake, 0.7, 7.5, [1.0, 1.0, 1.0, 1.0])
    assert not torch.allclose(got, flat, atol=1e-6)


def test_dasm_single_late_point_and_call_counts(schedule):
    """Only the 4th point weighted: its value depends on three Euler moves; the last linspace entry is never run."""
    student, hr, noise = latents(10)
    teacher, fake = teacher_model(), fake_model()
    config = TSDConfig(dasm=True, dasm_weights=(0.0, 0.0, 0.0, 1.0), dasm_random_bias=0)
    got = tsd_gradient(student, hr, noise, 100, schedule, teacher, fake, COND, UNCOND, config)
    evaluated = sorted({round(call[1][0].item(), 3) for call in teacher.calls})
    assert evaluated == sorted(round(schedule.timesteps[i].item(), 3) for i in (100, 150, 200, 250))
    assert len(teacher.calls) == 2 * 4 and len(fake.calls) == 4  # batched CFG: one call per branch and point
    want = reference_tsd(
        student, hr, noise, [100, 150, 200, 250], schedule, teacher, fake, 0.7, 7.5, [0.0, 0.0, 0.0, 1.0]
    )
    torch.testing.assert_close(got, want)
    assert got.abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------------------------
# fake-score loss
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighting", ["logit_normal", "sigma_sqrt", "none"])
def test_fake_score_loss_zero_for_exact_velocity(schedule, weighting):
    student, noise, _ = latents(12)
    exact = lambda z, t, cond: noise - student  # the true flow velocity eps - zh
    loss = fake_score_loss(
        exact, student, noise, torch.tensor([60, 900]), schedule, COND, weighting, torch.Generator().manual_seed(0)
    )
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    off = lambda z, t, cond: noise - student + 0.3
    assert fake_score_loss(off, student, noise, 500, schedule, COND, weighting).item() > 0


def test_fake_score_loss_weightings(schedule):
    student, noise, _ = latents(13)
    delta = 0.3
    off = lambda z, t, cond: noise - student + delta  # x0 - zh = -sigma * delta
    idx = torch.tensor([60, 900])
    sigma = schedule.sigmas[idx].to(DT)
    per_sample = 0.5 * sigma**2 * delta**2  # mean over one sample's elements of 0.5 (sigma delta)^2
    none = fake_score_loss(off, student, noise, idx, schedule, COND, "none")
    assert none.item() == pytest.approx(per_sample.mean().item())
    sigma_sqrt = fake_score_loss(off, student, noise, idx, schedule, COND, "sigma_sqrt")
    assert sigma_sqrt.item() == pytest.approx(0.5 * delta**2)  # sigma^-2 cancels sigma^2
    logit = fake_score_loss(off, student, noise, idx, schedule, COND, "logit_normal", torch.Generator().manual_seed(5))
    w = torch.sigmoid(torch.randn(2, generator=torch.Generator().manual_seed(5))).to(DT)
    assert logit.item() == pytest.approx((w * per_sample).mean().item())
    with pytest.raises(ValueError, match="weighting"):
        fake_score_loss(off, student, noise, idx, schedule, COND, "mode")


def test_fake_score_loss_detaches_student_and_trains_fake(schedule):
    student = torch.randn(SHAPE, dtype=DT, requires_grad=True)
    noise = torch.randn(SHAPE, dtype=DT)
    gain = torch.tensor(0.4, dtype=DT, requires_grad=True)
    seen = []

    def fake(z, t, cond):
        seen.append(t)
        assert cond.pooled[0, 0].item() == 1.5  # conditional branch only, no CFG
        return gain * z

    loss = fake_score_loss(fake, student, noise, 300, schedule, COND, "none")
    loss.backward()
    assert student.grad is None and gain.grad is not None and gain.grad.abs() > 0
    assert len(seen) == 1 and torch.equal(seen[0], schedule.timestep(torch.tensor([300, 300])))


# ----------------------------------------------------------------------------------------------------------------
# KD terms and adversarial losses
# ----------------------------------------------------------------------------------------------------------------


def test_latent_losses():
    a = torch.tensor([[1.0, -2.0]])
    b = torch.tensor([[0.0, 0.0]])
    assert latent_mse(a, b).item() == pytest.approx(2.5)
    assert latent_l1(a, b).item() == pytest.approx(1.5)
    with pytest.raises(ValueError):
        latent_l1(a, torch.zeros(1, 3))


def test_feature_kd_loss():
    s = [torch.ones(2, 3), torch.zeros(4)]
    t = [torch.zeros(2, 3), torch.full((4,), 2.0)]
    assert feature_kd_loss(s, t).item() == pytest.approx((1.0 + 4.0) / 2)
    with pytest.raises(ValueError, match="2 student features but 1 teacher"):
        feature_kd_loss(s, t[:1])
    with pytest.raises(ValueError, match=r"student_feats\[1\].*teacher_feats\[1\]"):
        feature_kd_loss(s, [t[0], torch.zeros(5)])
    student = torch.ones(3, requires_grad=True)
    teacher = torch.zeros(3, requires_grad=True)
    feature_kd_loss([student], [teacher]).backward()
    assert teacher.grad is None and student.grad is not None


def test_adversarial_loss_arithmetic():
    real = torch.tensor([2.0, 0.5])
    fake = torch.tensor([-2.0, 0.5])
    # mean(relu(1 - real)) + mean(relu(1 + fake)) = mean(0, .5) + mean(0, 1.5)
    assert hinge_d_loss(real, fake).item() == pytest.approx(1.0)
    assert hinge_g_loss(fake).item() == pytest.approx(0.75)
    # Per-head lists: hinge per head, then averaged (TAD-SR Eq. 12 up to the 1/K factor).
    heads_real, heads_fake = [real, torch.tensor([0.0, 0.0])], [fake, torch.tensor([0.0, 0.0])]
    assert hinge_d_loss(heads_real, heads_fake).item() == pytest.approx((1.0 + 2.0) / 2)
    assert hinge_g_loss(heads_fake).item() == pytest.approx((0.75 + 0.0) / 2)


# ----------------------------------------------------------------------------------------------------------------
# TAD-SR
# ----------------------------------------------------------------------------------------------------------------


def test_small_index_range_has_small_sigma(schedule):
    low, high = SMALL_INDEX_RANGE
    sigmas = schedule.sigmas[low:high]
    assert float(sigmas.max()) <= 0.02 and float(sigmas.min()) > 0
    draws = sample_small_indices(schedule, 1000, torch.Generator().manual_seed(0))
    assert int(draws.min()) == low and int(draws.max()) == high - 1


def test_hf_gradient_zero_when_student_equals_teacher(schedule):
    student, _, noise = latents(14)
    teacher = teacher_model()
    grad = hf_score_distillation_gradient(student, student.clone(), noise, 996, schedule, teacher, COND)
    assert torch.count_nonzero(grad) == 0


def test_hf_gradient_matches_eq8_on_affine_teacher(schedule):
    student, tch, noise = latents(15)
    teacher = teacher_model()
    idx = torch.tensor([994, 999])
    grad = hf_score_distillation_gradient(student, tch, noise, idx, schedule, teacher, COND)
    # Eq. 8 written with x0 predictions: omega (1 - s)/s (z_stu - z_tch + x0(z_tch_t) - x0(z_stu_t)).
    s = schedule.sigmas[idx].to(DT).reshape(-1, 1, 1, 1)
    t = schedule.timesteps[idx]
    z_stu_t, z_tch_t = (1 - s) * student + s * noise, (1 - s) * tch + s * noise
    x0_stu = z_stu_t - s * teacher(z_stu_t, t, COND.expand(2))
    x0_tch = z_tch_t - s * teacher(z_tch_t, t, COND.expand(2))
    omega = 1.0 / (3 * 4 * 5)
    want = omega * (1 - s) / s * (student - tch + x0_tch - x0_stu)
    torch.testing.assert_close(grad, want, rtol=1e-9, atol=1e-12)
    # Eq. 7 form: omega * (eps_hat(z_stu_t) - eps_hat(z_tch_t)), eps_hat = (z_t - (1 - s) x0) / s.
    eps = lambda z_t, x0: (z_t - (1 - s) * x0) / s
    torch.testing.assert_close(grad, omega * (eps(z_stu_t, x0_stu) - eps(z_tch_t, x0_tch)), rtol=1e-6, atol=1e-12)
    # Teacher called once, on both branches, conditional only (no CFG).
    assert len(teacher.calls) == 3 and teacher.calls[0][0] == 4 and teacher.calls[0][2].pooled[0, 0].item() == 1.5


def test_hf_gradient_direction_with_identity_denoiser(schedule):
    """A teacher predicting x0 = z_t (v = 0) leaves grad = omega (1 - s)(z_stu - z_tch): descent pulls to teacher."""
    student, tch, noise = latents(16)
    grad = hf_score_distillation_gradient(student, tch, noise, 995, schedule, Affine(0.0), COND)
    s = schedule.sigmas[995].item()
    torch.testing.assert_close(grad, (1 - s) / 60 * (student - tch))
    assert bool((torch.sign(grad) == torch.sign(student - tch)).all())


def test_hf_loss_injects_grad_over_batch():
    student = torch.randn(SHAPE, dtype=DT, requires_grad=True)
    grad = torch.randn(SHAPE, dtype=DT)
    hf_score_distillation_loss(student, grad).backward()
    torch.testing.assert_close(student.grad, grad / SHAPE[0])


def test_discriminator_inputs_share_timestep(schedule):
    real, fake, noise = latents(17)
    idx = torch.tensor([10, 600])
    z_real, t_real = discriminator_inputs(real, noise, idx, schedule)
    z_fake, t_fake = TimeAwareDiscriminator.discriminator_inputs(fake, noise, idx, schedule)
    assert torch.equal(t_real, t_fake) and torch.equal(t_real, schedule.timesteps[idx])
    s = schedule.sigmas[idx].to(DT).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(z_real, (1 - s) * real + s * noise)
    torch.testing.assert_close(z_fake, (1 - s) * fake + s * noise)


@pytest.fixture(scope="module")
def tiny_parts():
    from compress.models.presets import build_random_components, get_preset

    transformer, _, prompt, pooled = build_random_components(get_preset("tiny"), seed=0)
    return transformer, prompt, pooled


@pytest.fixture(scope="module")
def discriminator(tiny_parts):
    transformer, _, _ = tiny_parts
    torch.manual_seed(0)
    return TimeAwareDiscriminator(transformer, num_blocks=3, head_hidden_dim=32, time_embed_dim=32)


def test_discriminator_structure_and_freezing(tiny_parts, discriminator):
    transformer, _, _ = tiny_parts
    d = discriminator
    assert len(d.blocks) == 3 and len(d.heads) == 3
    assert all(not p.requires_grad for m in d.backbone_modules() for p in m.parameters())
    trainable = {id(p) for p in d.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in d.trainable_parameters()} and trainable
    heads = {id(p) for m in (d.heads, d.time_mlp) for p in m.parameters()}
    assert trainable == heads
    # with a trainable backbone the optimiser gets the copied blocks too
    full = TimeAwareDiscriminator(transformer, num_blocks=1, head_hidden_dim=8, time_embed_dim=8, train_backbone=True)
    assert {id(p) for p in full.trainable_parameters()} == {id(p) for p in full.parameters()}
    assert all(p.requires_grad for p in transformer.parameters())  # the teacher itself is left alone
    # A deep copy: no storage shared with the teacher.
    teacher_ptrs = {p.data_ptr() for p in transformer.parameters()}
    assert not any(p.data_ptr() in teacher_ptrs for p in d.parameters())
    d.train()
    assert d.heads.training and not any(m.training for m in d.backbone_modules())
    d.eval()
    with pytest.raises(ValueError, match="num_blocks"):
        TimeAwareDiscriminator(transformer, num_blocks=5)
    with pytest.raises(ValueError, match="SD3"):
        TimeAwareDiscriminator(torch.nn.Linear(2, 2))


def test_discriminator_outputs_and_time_awareness(tiny_parts, discriminator):
    _, prompt, pooled = tiny_parts
    cond = Conditioning(prompt, pooled)
    z = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([900.0, 900.0])
    with torch.no_grad():
        logits = discriminator(z, t, cond)
        heads = discriminator(z, t, cond, return_all=True)
        other_t = discriminator(z, torch.tensor([100.0, 100.0]), cond)
    assert logits.shape == (2,) and len(heads) == 3 and all(h.shape == (2,) for h in heads)
    torch.testing.assert_close(logits, torch.stack(heads).mean(0))
    assert not torch.allclose(logits, other_t)
    # The heads themselves are time-conditioned (Eq. 10), not only the backbone features.
    head = discriminator.heads[0]
    feats = discriminator.features(z, t, cond)[0]
    with torch.no_grad():
        e1 = discriminator.time_mlp(discriminator.time_proj(torch.tensor([900.0, 900.0])))
        e2 = discriminator.time_mlp(discriminator.time_proj(torch.tensor([100.0, 100.0])))
        assert not torch.allclose(head(feats, e1), head(feats, e2))
    assert isinstance(head, TimeConditionedHead)


def test_discriminator_gradients_and_training_step(tiny_parts):
    transformer, prompt, pooled = tiny_parts
    torch.manual_seed(0)
    d = TimeAwareDiscriminator(transformer, num_blocks=2, head_hidden_dim=32, time_embed_dim=32)
    cond = Conditioning(prompt, pooled)
    schedule = FlowSchedule()
    g = torch.Generator().manual_seed(2)
    real = torch.randn(4, 16, 8, 8, generator=g)
    fake = (torch.randn(4, 16, 8, 8, generator=g) * 0.3 + 1.0).requires_grad_(True)
    noise = torch.randn(4, 16, 8, 8, generator=g)
    idx = schedule.sample_indices(4, g, 0, 1000)
    z_fake, t = discriminator_inputs(fake, noise, idx, schedule)
    hinge_g_loss(d(z_fake, t, cond)).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0  # the generator gets a signal through frozen blocks
    assert all(p.grad is None for m in d.backbone_modules() for p in m.parameters())
    assert all(p.grad is not None for p in d.trainable_parameters())

    optimizer = torch.optim.Adam(d.trainable_parameters(), lr=1e-2)
    d.train()
    losses = []
    for _ in range(15):
        z_real, t = discriminator_inputs(real, noise, idx, schedule)
        z_fake, _ = discriminator_inputs(fake.detach(), noise, idx, schedule)
        loss = hinge_d_loss(d(z_real, t, cond, return_all=True), d(z_fake, t, cond, return_all=True))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2


# ----------------------------------------------------------------------------------------------------------------
# perceptual
# ----------------------------------------------------------------------------------------------------------------


def test_stlpips_loss_offline_and_differentiable():
    module, name = build_perceptual_loss("stlpips")
    assert name == "stlpips"
    assert all(not p.requires_grad for p in module.parameters())
    module.train()
    assert not module.net.training
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g, requires_grad=True)
    y = torch.rand(2, 3, 32, 32, generator=g)
    loss = module(x, y)
    assert loss.ndim == 0 and loss.item() > 0
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert module(y, y).item() == pytest.approx(0.0, abs=1e-6)


def test_perceptual_auto_and_unknown():
    _, name = build_perceptual_loss("auto")
    assert name == ("stlpips" if lpips_missing_files() else "lpips")
    with pytest.raises(ValueError, match="unknown perceptual loss"):
        build_perceptual_loss("dists")


def test_lpips_refuses_without_cached_alexnet(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ValueError, match=r"alexnet-owt-7be5be79\.pth.*download"):
        build_perceptual_loss("lpips")
    assert build_perceptual_loss("auto")[1] == "stlpips"


def test_lpips_uses_cached_alexnet_without_network(tmp_path, monkeypatch):
    """A (random, features-only) AlexNet file in the hub cache is what LPIPS loads; nothing is downloaded."""
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    features = torchvision.models.alexnet(weights=None).features
    path = tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    path.parent.mkdir(parents=True)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)

    def no_download(*args, **kwargs):
        raise AssertionError("download attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    module, name = build_perceptual_loss("auto")
    assert name == "lpips"
    torch.testing.assert_close(getattr(module.net.net.slice1, "0").weight, features[0].weight)
    torch.testing.assert_close(getattr(module.net.net.slice5, "10").weight, features[10].weight)
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    module(x, torch.rand(1, 3, 32, 32)).backward()
    assert x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in module.parameters())
