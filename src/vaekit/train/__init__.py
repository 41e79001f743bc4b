"""Training and decoder fine-tuning with Accelerate.

- `config`: TrainConfig and its sections (no torch);
- `losses`, `discriminator`: the loss terms and the PatchGAN;
- `steps`: one generator and one discriminator micro-step through the prepared modules;
- `sampler`: which images each step trains on, a function of (seed, epoch, index);
- `checkpoint`: the checkpoint folder, written and read by one module (model loading uses it too);
- `validation`, `tracking`: held-out scores and grids; log lines, tracker and progress bar;
- `loop`: `train(config)`, the run from setup to export.
"""

from vaekit.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "TrainConfig": "config",
    "ModelConfig": "config",
    "LossConfig": "config",
    "DiscConfig": "config",
    "OptimConfig": "config",
    "EMAConfig": "config",
    "RunConfig": "config",
    "ValidationConfig": "config",
    "LogConfig": "config",
    "check_config": "config",
    "AutoencoderForTraining": "steps",
    "generator_step": "steps",
    "discriminator_step": "steps",
    "StepBatchSampler": "sampler",
    "load_checkpoint_vae": "checkpoint",
    "train": "loop",
})
