"""Training: re-distillation of (compressed) one-step students and the built-in reference kit.

`distill.recipe` runs TSD-SR's TSD loss, TinySR's knowledge-distillation stages and TAD-SR's alternative on
Accelerate (`python -m distill train`); `distill.training` holds the helpers every loop shares (checkpoints,
RNG state, LR schedule, CSV log); `distill.reference` trains the miniature kit the built-in student comes from.
Imports `compress`, never the reverse (docs/layout.md).
"""
