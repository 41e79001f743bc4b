"""Checks every process makes before the first collective, and their agreement: one error on every rank, no hang.

Without it, a process that lacks the LPIPS weights or the data raises while the others wait in DDP's
first broadcast until the process-group timeout (30 minutes by default), and the launcher shows one
traceback among many silent processes. Here each process runs its own checks, catching what fails,
then all exchange a short status; if any failed, every process raises the same message, naming
the failing ranks, and exits non-zero at once.

The exchange is an `all_gather_object` on the process group Accelerate has just created with
`train.timeout_s` (`InitProcessGroupKwargs`), chosen over a file rendezvous because nodes of a
multi-node job need not share a file system, and the group already bounds the wait: a process that
never arrives (killed, stuck in a read) stops the others after the timeout with an error naming it.
"""

import logging
import os
import traceback

from accelerate.utils import DistributedType, gather_object

from vaekit.errors import VaekitError

log = logging.getLogger("vaekit.train")

# Why vaekit trains VAEs with DDP only: what FSDP or DeepSpeed ZeRO sharding would break in this trainer.
SHARDING_REFUSED = (
    "{what} is not supported by vaekit train; launch with DDP (accelerate launch --multi_gpu, or torchrun). "
    "A VAE of up to a few hundred million parameters fits on every GPU, and sharding would break this "
    "trainer: checkpoints and exports read the full state dict, which sharded parameters do not hold "
    "without a gather; the EMA would average shards instead of weights; the adaptive GAN weight "
    "differentiates through the decoder's last-layer parameter, which sharding replaces by a flat "
    "shard; and the VAE and the discriminator are two models with two optimizers, which Accelerate's "
    "DeepSpeed integration does not prepare. Unset {variable} (or choose 'No' for FSDP/DeepSpeed in "
    "`accelerate config`)."
)
SHARDING_VARIABLES = {"FSDP": "ACCELERATE_USE_FSDP", "DeepSpeed": "ACCELERATE_USE_DEEPSPEED"}


def refuse_sharding(distributed_type=None):
    """Stop with the reason when FSDP or DeepSpeed was asked for, by Accelerate's environment or its state."""
    for what, variable in SHARDING_VARIABLES.items():
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes"):
            raise VaekitError(SHARDING_REFUSED.format(what=what, variable=variable))
    refused = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed"}
    if distributed_type in refused:
        what = refused[distributed_type]
        raise VaekitError(SHARDING_REFUSED.format(what=what, variable=SHARDING_VARIABLES[what]))


def run_check(what, check):
    """(result, None) when `check()` succeeds, else (None, (what, message)); unexpected errors log a traceback."""
    try:
        return check(), None
    except VaekitError as e:
        return None, (what, str(e))
    except Exception as e:  # any failure must reach the agreement, or the other processes would wait for this one
        log.error("%s failed:\n%s", what, traceback.format_exc())
        return None, (what, f"{type(e).__name__}: {e}")


def agree_ready(accelerator, failures, facts=None):
    """Exchange this process's failures [(what, message)] and `facts`; raise on every process if any failed.

    Returns every process's `facts` (a small picklable value), in rank order, for checks that need
    the processes to agree (the checkpoint each one resumes from). A single process raises its own
    messages as they are.
    """
    if accelerator.num_processes == 1:
        if failures:
            raise VaekitError(" ".join(text for _, text in failures))
        return [facts]
    statuses = gather_object([(list(failures), facts)])
    failed = [(rank, problems) for rank, (problems, _) in enumerate(statuses) if problems]
    if failed:
        lines = [f"rank {rank}: " + "; ".join(f"{what}: {text}" for what, text in problems)
                 for rank, problems in failed]
        raise VaekitError(f"{len(failed)} of {len(statuses)} processes cannot start, so none does. "
                          + " | ".join(lines))
    return [f for _, f in statuses]
