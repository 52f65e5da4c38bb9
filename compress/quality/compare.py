"""Compare a student with the model it came from: identical weights (a hash) and quality on the validation
photos. Shared by `compress prune` (a compressed student vs the original) and `export` (an artifact vs its
source student)."""

from __future__ import annotations

import hashlib

import torch

from compress.models.student import OneStepSR


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 over the state dict (names, shapes, bytes): equal hashes mean identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _unit(image: torch.Tensor) -> torch.Tensor:
    return image.float().clamp(0, 1).cpu()


def quality(original: OneStepSR, student: OneStepSR, metrics: tuple[str, ...], limit: int | None = None,
            bicubic_metrics: tuple[str, ...] | None = None, compare_outputs: bool = True, pairs=None,
            original_outputs: dict | None = None) -> dict:
    """Every requested metric of the student vs HR, of the uncompressed student vs HR, and of the student vs
    the uncompressed student's output, on the validation photos (Real-ESRGAN degradation, 256 px, wavelet).

    `student` may be anything compress.pipeline.upscale_tensor runs (an exported artifact too). `limit`
    scores the first N photos; `bicubic_metrics` restricts bicubic's row to those metrics (a budget only
    compares bicubic on its beat_bicubic list); `compare_outputs=False` drops the student-vs-original row.
    `pairs`: (name, LR, HR) to score instead of the validation photos (a user's folder). `original_outputs`: a
    dict the caller keeps between calls on the same photos, so the uncompressed student runs once per photo."""
    from compress.data.pairs import fixed_validation_pairs
    from compress.evaluate import DEFAULT_METRICS, build_scorers
    from compress.options import DEFAULT_COLOR_FIX, TileSettings
    from compress.pipeline import upscale_tensor

    if metrics == ("none",):
        return {}
    names = DEFAULT_METRICS if metrics == ("all",) else metrics
    scorers, skipped = build_scorers(names, "cpu")
    pairs = (fixed_validation_pairs("realesrgan", hr_size=256) if pairs is None else list(pairs))[:limit]
    rows = {"student_vs_hr": [], "original_vs_hr": [], "bicubic_vs_hr": [], "student_vs_original": []}
    cache = {} if original_outputs is None else original_outputs
    for name, lr, hr in pairs:
        lr, hr = (lr[None], hr[None]) if lr.dim() == 3 else (lr, hr)
        settings = TileSettings(mode="auto")
        ours = _unit(upscale_tensor(student, lr, settings, DEFAULT_COLOR_FIX))
        if name not in cache:
            cache[name] = _unit(upscale_tensor(original, lr, settings, DEFAULT_COLOR_FIX))
        theirs = cache[name]
        bicubic = _unit(torch.nn.functional.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False))
        for key, image, reference in (("student_vs_hr", ours, hr), ("original_vs_hr", theirs, hr),
                                      ("bicubic_vs_hr", bicubic, hr), ("student_vs_original", ours, theirs)):
            if key == "student_vs_original" and not compare_outputs:
                continue
            scores = {}
            for name, (kind, _, fn) in scorers.items():
                if kind != "fr" and key == "student_vs_original":
                    continue  # a no-reference score does not compare two images
                if key == "bicubic_vs_hr" and bicubic_metrics is not None and name not in bicubic_metrics:
                    continue
                value = fn(image, reference) if kind == "fr" else fn(image)
                scores[name] = float(torch.as_tensor(value).float().mean())
            rows[key].append(scores)
    means = {key: {m: sum(r[m] for r in values) / len(values) for m in values[0]}
             for key, values in rows.items() if values}
    return {**means, "higher_is_better": {m: hib for m, (_, hib, _) in scorers.items()}, "skipped": skipped,
            "images": len(pairs), "degradation": "realesrgan", "color_fix": DEFAULT_COLOR_FIX}
