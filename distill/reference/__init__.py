"""Training of the built-in miniature TSD-SR reference kit (``scripts/train_reference.py`` drives it).

The reference kit is a small SD3-topology model (preset ``reference``) trained for real on CPU from the photos
this toolkit ships (``compress.data``). It plays the part of SD3-medium in TSD-SR (Wu et al., CVPR 2025):

* stage 1, :func:`train_vae` (``vae.py``): an ``AutoencoderKL`` trained on random HR crops;
* stage 1b, :func:`finetune_decoder` (``decoder.py``): more decoder-only training on the frozen encoder;
* stage 2, :func:`train_prior` (``prior.py``): an ``SD3Transformer2DModel`` trained from scratch as a
  rectified-flow text-to-image prior on the VAE's latents (the teacher score model);
* stage 3 (TSD distillation of the LoRA student) is ``python -m distill`` on the folder :func:`assemble_kit`
  (``kit.py``) writes.

Module map: ``data.py`` (step-addressable crop batches), ``stage.py`` (skip/extend/restart, settings checks,
a stage's Accelerate run state), ``vae.py``, ``decoder.py``, ``prior.py``, ``kit.py`` (the prior folder:
TSD-SR release layout, ``compress.models.release.prior_paths``). Checkpoints, RNG state, LR schedule and the
CSV log come from ``distill/training.py``, shared with ``distill.recipe.DistillRecipe``.

Outputs, under an output root ``out`` (itself a prior folder once stages 1 and 2 ran)::

    out/base/{vae,transformer,scheduler}                   diffusers folders (save_pretrained)
    out/dataset/{default,null}/{prompt_embeds,pool_embeds}.pt
    out/decoder/vae                                        stage 1b's VAE
    out/<stage>/log.csv, checkpoints/step-NNNNNNN/, metrics.json
    out/kit/                                               the prior folder of stage 3
"""

from distill.reference.data import (
    CropStream,
    color_augment,
    iterate_batches,
    resolve_photos,
    to_model_range,
)
from distill.reference.decoder import DecoderConfig, finetune_decoder
from distill.reference.kit import (
    assemble_kit,
    load_embeddings,
    load_reference_base,
    load_trained_vae,
    save_embeddings,
)
from distill.reference.prior import (
    LatentBank,
    PriorConfig,
    build_transformer,
    flow_matching_loss,
    make_embeddings,
    sample_prior,
    sample_sigmas,
    train_prior,
)
from distill.reference.vae import (
    VAEConfig,
    build_vae,
    measure_scaling_factor,
    reconstruction_psnr,
    train_vae,
)

__all__ = [
    "CropStream",
    "DecoderConfig",
    "LatentBank",
    "PriorConfig",
    "VAEConfig",
    "assemble_kit",
    "build_transformer",
    "build_vae",
    "color_augment",
    "finetune_decoder",
    "flow_matching_loss",
    "iterate_batches",
    "load_embeddings",
    "load_reference_base",
    "load_trained_vae",
    "make_embeddings",
    "measure_scaling_factor",
    "reconstruction_psnr",
    "resolve_photos",
    "sample_prior",
    "sample_sigmas",
    "save_embeddings",
    "to_model_range",
    "train_prior",
    "train_vae",
]
