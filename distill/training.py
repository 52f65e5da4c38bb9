"""``distill.training``: the training helpers every loop shares (checkpoints, logs, schedules, the accelerator).

They live in ``compress.training`` so that prune's recovery (which may not import ``distill``) resumes the same
way as distillation; this module keeps the ``distill.training`` names working.
"""

from compress.training import (  # noqa: F401
    CHECKPOINT_DIR,
    CheckpointManager,
    CsvLog,
    GeneratorStates,
    LOG_NAME,
    SCHEDULES,
    TRAINER_STATE,
    latest_trainer_state,
    list_checkpoints,
    make_accelerator,
    read_trainer_state,
    sync_lr,
    warmup_cosine,
)
