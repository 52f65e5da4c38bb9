"""Learnable N:M depth pruning: TinyFusion's differentiable mask search with TinySR's DIA and ECS.

TinyFusion (Fang et al., CVPR 2025, Sec. 3): the blocks are split into consecutive groups of M and N of
each group are kept. Every group owns a learnable logit vector over all C(M, N) binary options (initialised
to the constant 0.02, as TinyFusion's code), and each training step draws one option per group with the
straight-through hard Gumbel-softmax, one_hot(softmax((g + scaling * logits) / tau)) @ options, while a LoRA
(the weight update ΔΦ) is trained jointly, so the search scores a mask by how well the model *recovers*
once that mask is applied, not by the immediate loss alone. tau is annealed linearly (4 -> 0.1), the logits
are multiplied by a constant `scaling` (100) and take a 10x larger learning rate than the LoRA.

TinySR (Sun et al. 2025, Sec. 3.1, Eqs. 1-3) lets adjacent groups trade a layer:
- Expansion-Corrosion Strategy (ECS, Eq. 2): for a group's sampled mask m, m̂ is the option with the largest
  logit among those sharing N - k layers with m (k = 1: every other option that overlaps m as much as
  possible; for 2:4 "shares one layer"), detached; corrosion m⁻ = m ⊙ m̂ keeps one layer less, expansion
  m⁺ = clamp(m + m̂, 0, 1) one layer more.
- Dynamic Inter-block Activation (DIA, Eq. 3): adjacent groups form pairs (0, 1), (2, 3), ...; each pair has
  a learnable 3-way logit (init 0.02) sampled the same way, q = G(logits), over (corrode first & expand
  second, keep both, expand first & corrode second); the first group's mask is qᵀ[m⁻, m, m⁺] and the
  second's qᵀ[m⁺, m, m⁻], so a 2:4 pair ends 1+3, 2+2 or 3+1 and always keeps 2N layers. An odd last group
  has no pair and keeps N.

Loss (TinySR Sec. 3.1, pruning-decision training): L = λ_p·LPIPS(D(z_stu), x_HR) + λ_l·‖z_stu − z_tea‖₁ with
z_stu = z_L − v_masked(z_L) (the masked, LoRA-adapted student) and z_tea = z_L − v(z_L) of the unpruned
student (run without gradients on the model passed in, which is never modified). The VAE is frozen; the
perceptual term backpropagates through the decoder. The perceptual net is ST-LPIPS (alex), the toolkit's
LPIPS-type metric; without it the loss falls back to the latent term and the decision says so.

Decision: a block's keep probability π_i is the marginal of its group's option distribution,
Σ_{options ∋ i} softmax(scaling · logits) (the categorical the sampler draws from at tau = 1). Each group
takes its most likely option; each pair applies its most likely DIA outcome to those options, corroding by
dropping the kept layer with the lowest π and expanding by adding the removed layer with the highest π
(ties towards the earlier block). `learnable_decision` returns only the decision; the LoRA is thrown away.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable

import torch

from compress.models.compact import CompactSD3Transformer
from compress.prune.depth import DepthDecision

# Linears of a compact block (diffusers names) that get the search-time LoRA.
LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)
GATE_INIT = 0.02  # TinyFusion's constant logit initialisation
DIA_OUTCOMES = ("corrode_first_expand_second", "keep_both", "expand_first_corrode_second")


# ----------------------------------------------------------------------------------------------------------
# Options, marginals, ECS and DIA (pure tensor functions)
# ----------------------------------------------------------------------------------------------------------


def group_options(n: int, m: int) -> torch.Tensor:
    """All C(m, n) binary keep-masks of one group, C(m, n) x m, rows in itertools.combinations order."""
    if not 1 <= n < m:
        raise ValueError(f"N:M needs 1 <= N < M, got {n}:{m}")
    combos = list(itertools.combinations(range(m), n))
    options = torch.zeros(len(combos), m)
    for row, kept in enumerate(combos):
        options[row, list(kept)] = 1.0
    return options


def keep_probabilities(logits: torch.Tensor, options: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """π: G x K option logits -> G*M per-block keep probabilities, Σ_{options ∋ i} softmax(scaling·logits).

    Each group's π sums to N (every option keeps N layers).
    """
    probs = torch.softmax(logits * scaling, dim=-1)
    return (probs @ options).reshape(-1)


def sample_hard(logits: torch.Tensor, tau: float, scaling: float, generator: torch.Generator | None) -> torch.Tensor:
    """Straight-through hard Gumbel-softmax (as F.gumbel_softmax(logits*scaling, tau, hard=True)), seeded.

    Forward: one_hot(argmax(g + scaling·logits)); backward: the gradient of softmax((g + scaling·logits)/tau).
    """
    exponential = torch.empty(logits.shape, dtype=logits.dtype, device="cpu").exponential_(generator=generator)
    gumbels = -exponential.log().to(logits.device)
    soft = torch.softmax((logits * scaling + gumbels) / tau, dim=-1)
    index = soft.argmax(dim=-1, keepdim=True)
    hard = torch.zeros_like(soft).scatter_(-1, index, 1.0)
    return hard - soft.detach() + soft


def neighbour_option(mask: torch.Tensor, logits: torch.Tensor, options: torch.Tensor, k: int = 1) -> torch.Tensor:
    """ECS's m̂ (detached): the highest-logit option sharing exactly N - k layers with `mask` (ties: first)."""
    n = int(options[0].sum())
    shared = options @ mask.detach().round()
    candidates = shared == (n - k)
    if not bool(candidates.any()):
        raise ValueError(f"no option shares {n - k} layers with {mask.tolist()} in {n}:{options.shape[1]}")
    masked = torch.where(candidates, logits.detach(), torch.full_like(logits, -math.inf))
    return options[int(masked.argmax())].to(mask.dtype)


def ecs_candidates(mask: torch.Tensor, hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ECS (TinySR Eq. 2): corrosion m ⊙ m̂ (one layer fewer) and expansion clamp(m + m̂, 0, 1) (one more)."""
    hat = hat.detach()
    return mask * hat, torch.clamp(mask + hat, 0.0, 1.0)


def dia_mix(first: tuple[torch.Tensor, torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
            q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DIA (TinySR Eq. 3): first' = qᵀ[m⁻, m, m⁺], second' = qᵀ[m⁺, m, m⁻] for (m⁻, m, m⁺) of each group.

    q's entries follow DIA_OUTCOMES; with a one-hot q the pair keeps its total number of layers.
    """
    corroded_1, mask_1, expanded_1 = first
    corroded_2, mask_2, expanded_2 = second
    mixed_1 = q[0] * corroded_1 + q[1] * mask_1 + q[2] * expanded_1
    mixed_2 = q[0] * expanded_2 + q[1] * mask_2 + q[2] * corroded_2
    return mixed_1, mixed_2


def sample_block_mask(gate_logits: torch.Tensor, pair_logits: torch.Tensor, options: torch.Tensor, tau: float,
                      scaling: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """One differentiable num_blocks mask: per-group N:M options, ECS candidates, DIA mixing per pair."""
    choice = sample_hard(gate_logits, tau, scaling, generator)  # G x K
    masks = list(choice @ options)  # G masks of M
    if pair_logits.shape[0]:
        q = sample_hard(pair_logits, tau, scaling, generator)  # P x 3
        for p in range(pair_logits.shape[0]):
            a, b = 2 * p, 2 * p + 1
            triples = []
            for g in (a, b):
                corroded, expanded = ecs_candidates(masks[g], neighbour_option(masks[g], gate_logits[g], options))
                triples.append((corroded, masks[g], expanded))
            masks[a], masks[b] = dia_mix(triples[0], triples[1], q[p])
    return torch.cat(masks)


def final_kept(gate_logits: torch.Tensor, pair_logits: torch.Tensor, options: torch.Tensor,
               scaling: float) -> tuple[list[int], list[float], list[list[float]], list[str]]:
    """The decision: argmax option per group, argmax DIA outcome per pair applied by π rank (see module doc)."""
    m = options.shape[1]
    pi = keep_probabilities(gate_logits.detach().float(), options, scaling).tolist()
    groups = [{int(j) for j in torch.nonzero(options[int(row)]).flatten()} for row in gate_logits.argmax(-1)]
    q = torch.softmax(pair_logits.detach().float() * scaling, dim=-1)
    outcomes = []

    def corrode(g):
        kept = sorted(groups[g], key=lambda j: (pi[g * m + j], -j))
        groups[g].discard(kept[0])

    def expand(g):
        free = sorted(set(range(m)) - groups[g], key=lambda j: (-pi[g * m + j], j))
        groups[g].add(free[0])

    for p in range(q.shape[0]):
        outcome = int(q[p].argmax())
        outcomes.append(DIA_OUTCOMES[outcome])
        if outcome == 0:
            corrode(2 * p)
            expand(2 * p + 1)
        elif outcome == 2:
            expand(2 * p)
            corrode(2 * p + 1)
    kept = sorted(g * m + j for g, members in enumerate(groups) for j in members)
    return kept, pi, q.tolist(), outcomes


# ----------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------


def _fitting_nm(num_blocks: int, ratio: float) -> list[str]:
    """The N:M (M dividing num_blocks) for which ratio = 1 - N/M exactly."""
    fits = []
    for size in range(2, num_blocks + 1):
        keep = size * (1.0 - ratio)
        if num_blocks % size == 0 and abs(keep - round(keep)) < 1e-9 and 1 <= round(keep) < size:
            fits.append(f"{round(keep)}:{size}")
    return fits


def resolve_nm(num_blocks: int, ratio: float | None, n: int | None, m: int) -> tuple[int, int]:
    """(N, M) from the ratio or an explicit N, with messages that say what would work."""
    if int(m) != m or m < 2:
        raise ValueError(f"group size M must be an integer >= 2, got {m}")
    m = int(m)
    if ratio is not None and not 0.0 < ratio < 1.0:
        raise ValueError(f"depth ratio must be in (0, 1) for a learnable N:M search, got {ratio}")
    if num_blocks % m:
        sizes = [s for s in range(2, num_blocks + 1) if num_blocks % s == 0]
        hint = "" if ratio is None else f"; N:M that give ratio {ratio:g}: {', '.join(_fitting_nm(num_blocks, ratio)) or 'none'}"
        raise ValueError(f"{num_blocks} blocks do not split into groups of M = {m}; group sizes that divide "
                         f"{num_blocks}: {', '.join(map(str, sizes)) or 'none'}{hint}")
    if n is None:
        if ratio is None:
            raise ValueError("give the depth ratio or N explicitly")
        exact = m * (1.0 - ratio)
        if abs(exact - round(exact)) > 1e-9 or not 1 <= round(exact) < m:
            fits = _fitting_nm(num_blocks, ratio)
            raise ValueError(f"ratio {ratio:g} is not 1 - N/M for any N with M = {m} (M·(1 - ratio) = {exact:g}); "
                             f"give N and M explicitly (n=..., m=...) or pick M so that it is "
                             f"({', '.join(fits) if fits else f'no group size of {num_blocks} blocks fits'})")
        return round(exact), m
    if int(n) != n or not 1 <= n < m:
        raise ValueError(f"N:M needs an integer 1 <= N < M, got {n}:{m}")
    n = int(n)
    if ratio is not None and abs((1.0 - n / m) - ratio) > 1e-9:
        raise ValueError(f"ratio {ratio:g} contradicts {n}:{m} groups (which prune {1 - n / m:g}); "
                         f"pass ratio={1 - n / m:g}, or ratio=None with explicit N and M")
    return n, m


def _pair(value, name: str) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        value = (float(value), float(value))
    start, end = (float(v) for v in value)
    if not (start > 0 and end > 0 and math.isfinite(start) and math.isfinite(end)):
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return start, end


def linear_schedule(start: float, end: float, step: int, steps: int) -> float:
    """start -> end linearly over steps 0..steps-1 (start for a single step)."""
    return start if steps <= 1 else start + (end - start) * step / (steps - 1)


# ----------------------------------------------------------------------------------------------------------
# The search
# ----------------------------------------------------------------------------------------------------------


def _perceptual_net(weight: float, device: torch.device):
    """ST-LPIPS (alex) as a frozen module, or (None, reason) when it cannot be built."""
    if weight <= 0:
        return None, "off (perceptual_weight = 0)"
    try:
        from compress.quality.perceptual import stlpips_module

        return stlpips_module("alex").to(device), "ST-LPIPS alex"
    except (ImportError, OSError, RuntimeError) as err:  # missing wheel or weights: latent term only
        return None, f"unavailable ({type(err).__name__}: {err}); latent L1 only"


def learnable_decision(
    student,
    ratio: float | None = 0.5,
    seed: int = 0,
    steps: int = 100,
    n: int | None = None,
    m: int = 4,
    batch_size: int = 2,
    hr_size: int = 64,
    lr: float = 1e-4,
    gate_lr: float = 1e-3,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_targets: tuple[str, ...] = LORA_TARGETS,
    tau: float | tuple[float, float] = (4.0, 0.1),
    scaling: float | tuple[float, float] = 100.0,
    perceptual_weight: float = 1.0,
    latent_weight: float = 1.0,
    record_every: int = 10,
    progress: Callable[[int], None] | None = None,
) -> DepthDecision:
    """Search which blocks to keep with TinyFusion's N:M mask learning plus TinySR's DIA/ECS (module doc).

    `student` is a OneStepSR with a CompactSD3Transformer (compress.prune.conditioning.precache); it is not
    modified. Same arguments and seed -> same decision. `progress(1)` is called after every step.
    """
    transformer = getattr(student, "transformer", None)
    if not isinstance(transformer, CompactSD3Transformer):
        raise TypeError(f"the learnable depth search needs a CompactSD3Transformer student "
                        f"(compress.prune.conditioning.precache); got {type(transformer).__name__}")
    num_blocks = len(transformer.transformer_blocks)
    n, m = resolve_nm(num_blocks, ratio, n, m)
    for name, value in (("steps", steps), ("batch_size", batch_size), ("record_every", record_every),
                        ("lora_rank", lora_rank)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    upscale = student.settings.upscale
    if hr_size < upscale or hr_size % upscale:
        raise ValueError(f"hr_size must be a positive multiple of the upscale factor {upscale}, got {hr_size}")
    if lr <= 0 or gate_lr <= 0:
        raise ValueError(f"learning rates must be positive, got lr={lr}, gate_lr={gate_lr}")
    if perceptual_weight < 0 or latent_weight < 0 or perceptual_weight + latent_weight <= 0:
        raise ValueError(f"loss weights must be >= 0 and not both 0, got perceptual {perceptual_weight}, "
                         f"latent {latent_weight}")
    tau_range, scaling_range = _pair(tau, "tau"), _pair(scaling, "scaling")

    from compress.data import SRPairDataset, list_photos
    from compress.models.lora import add_lora

    device, dtype = student.device, student.dtype
    groups = num_blocks // m
    pairs = groups // 2
    options = group_options(n, m).to(device)
    dataset = SRPairDataset(list_photos("train"), hr_size=hr_size, degradation="realesrgan", seed=seed,
                            length=steps * batch_size, scale=upscale)
    generator = torch.Generator().manual_seed(seed)
    lpips, perceptual_note = _perceptual_net(perceptual_weight, device)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        work = copy.deepcopy(student)
        for parameter in work.parameters():
            parameter.requires_grad_(False)
        targets = [t for t in lora_targets if any(name == t or name.endswith("." + t)
                                                  for name, _ in work.transformer.named_modules())]
        add_lora(work.transformer, lora_rank, targets, adapter_name="depth_search", alpha=lora_alpha)
    lora_params = [p for name, p in work.transformer.named_parameters() if "lora_" in name]
    for parameter in lora_params:
        parameter.requires_grad_(True)
    gate_logits = torch.nn.Parameter(torch.full((groups, options.shape[0]), GATE_INIT, device=device))
    pair_logits = torch.nn.Parameter(torch.full((pairs, len(DIA_OUTCOMES)), GATE_INIT, device=device))
    optimizer = torch.optim.AdamW([
        {"params": lora_params, "lr": lr},
        {"params": [gate_logits, pair_logits], "lr": gate_lr, "weight_decay": 0.0},
    ])
    work.eval()  # no dropout anywhere; the LoRA and the gates still train

    def snapshot(step: int, tau_now: float, scale_now: float) -> dict:
        return {"step": step, "tau": tau_now, "scaling": scale_now,
                "pi": keep_probabilities(gate_logits.detach().float(), options, scale_now).tolist(),
                "dia": torch.softmax(pair_logits.detach().float() * scale_now, -1).tolist()}

    history = [snapshot(0, tau_range[0], scaling_range[0])]
    loss_curve = []
    window = []  # losses since the last loss_curve point
    for step in range(steps):
        tau_now = linear_schedule(*tau_range, step, steps)
        scale_now = linear_schedule(*scaling_range, step, steps)
        batch = [dataset[step * batch_size + i] for i in range(batch_size)]
        lr_images = torch.stack([item["lr"] for item in batch]).to(device, dtype)
        hr_images = torch.stack([item["hr"] for item in batch]).to(device, dtype)
        with torch.no_grad():
            latent = student.encode(student.preprocess(lr_images))
            target = latent - student.transformer(latent, return_dict=False)[0]
        mask = sample_block_mask(gate_logits, pair_logits, options, tau_now, scale_now, generator)
        restored = latent - work.transformer(latent, return_dict=False, block_mask=mask.to(dtype))[0]
        latent_term = (restored - target).abs().mean()
        loss = latent_weight * latent_term
        perceptual_term = None
        if lpips is not None:
            image = ((work.decode(restored)[..., :hr_size, :hr_size] + 1.0) / 2.0).float()
            perceptual_term = lpips(image, hr_images.float(), normalize=True).mean()
            loss = loss + perceptual_weight * perceptual_term
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = step + 1
        window.append(float(loss.detach()))
        if done % record_every == 0 or done == steps or step == 0:
            loss_curve.append({"step": done, "loss": window[-1], "loss_mean": sum(window) / len(window),
                               "latent_l1": float(latent_term.detach()),
                               "perceptual": None if perceptual_term is None else float(perceptual_term.detach()),
                               "mask": [round(float(v), 4) for v in mask.detach()]})
            window = []
        if done % record_every == 0 or done == steps:
            history.append(snapshot(done, tau_now, scale_now))
        if progress is not None:
            progress(1)

    final_scaling = scaling_range[1]
    kept, pi, dia, outcomes = final_kept(gate_logits, pair_logits, options, final_scaling)
    details = {
        "n": n, "m": m, "nm": f"{n}:{m}", "steps": steps, "seed": seed, "batch_size": batch_size,
        "hr_size": hr_size,
        "groups": [list(range(g * m, (g + 1) * m)) for g in range(groups)],
        "pairs": [[2 * p, 2 * p + 1] for p in range(pairs)],
        "unpaired_group": groups - 1 if groups % 2 else None,
        "options": [[int(v) for v in row] for row in options.tolist()],
        "option_probabilities": torch.softmax(gate_logits.detach().float() * final_scaling, -1).tolist(),
        "gate_logits": gate_logits.detach().float().tolist(),
        "dia_outcomes": list(DIA_OUTCOMES),
        "pair_distributions": dia,
        "pair_logits": pair_logits.detach().float().tolist(),
        "pair_decisions": outcomes,
        "keep_probability_history": history,
        "schedules": {"tau": {"kind": "linear", "start": tau_range[0], "end": tau_range[1]},
                      "scaling": {"kind": "linear" if scaling_range[0] != scaling_range[1] else "constant",
                                  "start": scaling_range[0], "end": scaling_range[1]}},
        "optimizer": {"name": "AdamW", "lora_lr": lr, "gate_lr": gate_lr, "gate_weight_decay": 0.0},
        "lora": {"rank": lora_rank, "alpha": lora_alpha, "targets": targets},
        "loss": {"perceptual": perceptual_note, "perceptual_weight": perceptual_weight if lpips is not None else 0.0,
                 "latent_weight": latent_weight},
        "loss_curve": loss_curve,
        "decision_rule": "argmax option per group; argmax DIA outcome per pair, corrode = drop lowest-pi kept "
                         "layer, expand = add highest-pi removed layer",
    }
    del work, optimizer
    return DepthDecision("learnable", kept, pi, details)
