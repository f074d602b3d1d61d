"""Several processes (`accelerate launch`, `torchrun`): devices, whole epochs, units of a step, the
reference model under sharding, and saving a sharded model.

Semantics (SPEC section 3 notation; P processes, A accumulation micro-batches of b samples per process):

- Epochs. The sample order of an epoch is one permutation (`EpochSampler`); accelerate deals its
  micro-batches of b out in turn (micro-batch k to process k mod P). With P > 1 the permutation is
  padded with *pad rows* (index -1, sample id -1) up to a multiple of P*b, so that every process runs
  the same number of micro-batches and accelerate never re-uses samples from the start of the epoch
  (its `even_batches`, which would train and log some samples twice). Pad rows are forwarded (every
  process must run the same collective operations) but never count: they are cut from partly padded
  micro-batches, a micro-batch of pad rows only has its loss multiplied by zero, and no log shows them.
- Units. The gradient of an optimizer step is the mean, over the step's *units*, of each unit's
  gradient. By default a unit is one micro-batch that holds real samples: `gamma F(l) + alpha R` of
  that micro-batch, with F a weighting over its b samples (`group` and `dv` act on each process's
  micro-batch). With M such micro-batches in a step, each process scales its micro-batch loss by P/M
  and DDP (or FSDP, DeepSpeed) averages the P gradients. When every micro-batch is full, M = P*A and
  this is what transformers does (loss / A, then the average over processes), so P processes x A
  accumulation steps train what 1 process x P*A accumulation steps trains.
- Global batch (`weighting.args.global_batch=true`): the weighting sees the P micro-batches of one
  micro-step together (the effective batch of P*b samples; accumulation micro-steps stay separate).
  Every process gathers the detached per-sample losses (and NLLs) of all processes, computes the
  weights w on the concatenation, and keeps its own rows. Its forget value is
  `F(l_all) + s * (sum_{i local} w_i l_i - stopgrad(same))`: the value (logged) is the global-batch
  F, the gradient is that of `s * sum_{i local} w_i l_i`. With s = M/M' (M' = micro-steps with real
  rows; s = P when nothing is padded) the P/M loss scale and the average over processes give
  `(1/M') * sum over micro-steps of sum_i w_i dl_i`: exactly the gradient of F on the concatenated
  batch, i.e. 1 process with micro-batches of P*b. The retain loss R stays a token mean per
  micro-batch (averaged over the micro-batches), so it equals the single-process one only when the
  micro-batches hold equally many retain tokens.
- `dv_global` gathers the losses of every process at every micro-step and applies the same update on
  every process, so its state is one state; `UnlearnTrainer.save_weighting_state` checks that and
  writes it into the run folder.
"""

from __future__ import annotations

import os

import torch

from baldro.errors import BaldroError

PAD_ID = -1  # the sample id (and sampler index) of a pad row


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def launch_world() -> tuple[int, int, int]:
    """(world size, rank, local rank) from the launcher's environment (1, 0, 0 when not launched)."""
    return _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def launched_strategy() -> str:
    """What `accelerate launch` was told: deepspeed, fsdp, ddp (several processes) or none."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "ddp" if launch_world()[0] > 1 else "none"


def is_main_process() -> bool:
    return launch_world()[1] == 0


def check_launched_world(args) -> None:
    """The Trainer runs as many processes as were launched. A GPU config launched where the device is
    missing (or `train.use_cpu=false` on a machine without GPUs) leaves every process training alone
    and writing its own copy of the run into the same folder."""
    world = launch_world()[0]
    if world > 1 and args.world_size != world:
        raise BaldroError(
            f"{world} processes were launched (WORLD_SIZE={world}) but the trainer runs this one alone (world size "
            f"{args.world_size}): the launch config does not fit this machine; on a machine without GPUs set "
            "train.use_cpu=true and use configs/accelerate/ddp_cpu.yaml (CPU processes over gloo), or launch one process"
        )


# --------------------------------------------------------------------------- the reference model
def zero_stage(accelerator) -> int | None:
    """The DeepSpeed ZeRO stage of this run, None without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return None
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def fsdp_version(accelerator) -> int | None:
    """1 or 2 under FSDP, None otherwise."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    return 2 if getattr(accelerator, "is_fsdp2", False) else 1


def loads_sharded(args) -> bool:
    """Whether from_pretrained, after these TrainingArguments, loads a model that a deep copy cannot
    duplicate: DeepSpeed ZeRO-3 (zero.Init partitions it) or FSDP with cpu_ram_efficient_loading
    (processes other than the first hold empty weights until FSDP broadcasts them)."""
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        is_deepspeed_zero3_enabled = lambda: False  # noqa: E731
    if is_deepspeed_zero3_enabled():
        return True
    return launched_strategy() == "fsdp" and _flag("FSDP_CPU_RAM_EFFICIENT_LOADING")


def shards_weights(args) -> bool:
    """Whether the trained model's weights will be split over the processes (FSDP, DeepSpeed ZeRO-3): no
    process can then run the model alone. Known from the launch before any weights load."""
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        is_deepspeed_zero3_enabled = lambda: False  # noqa: E731
    return launched_strategy() == "fsdp" or is_deepspeed_zero3_enabled()


def prepare_reference(ref_model, accelerator, device):
    """Place the frozen reference model for this run's strategy (it is never trained and has no optimizer):

    - one process, DDP, ZeRO-1/2: a full copy on this process's device (ZeRO-2 also keeps a full copy
      of the trained model's weights on every GPU, so the reference doubles that);
    - ZeRO-3: a DeepSpeed inference engine over the same stage-3 config, its weights partitioned over
      the processes like the trained model's (no optimizer state);
    - FSDP: sharded like the trained model (FSDP2: `fully_shard` per transformer layer, with the
      plugin's wrap policy; FSDP1: the plugin's FullyShardedDataParallel settings).
    """
    ref_model.eval().requires_grad_(False)
    stage = zero_stage(accelerator)
    version = fsdp_version(accelerator)
    if stage == 3:
        ref_model = _deepspeed_inference(ref_model, accelerator)
    elif version == 2:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        ref_model = fsdp2_prepare_model(accelerator, ref_model)
    elif version == 1:
        ref_model = _fsdp1_wrap(ref_model, accelerator)
    else:
        ref_model = ref_model.to(device)
    ref_model.eval()
    return ref_model


def _deepspeed_inference(model, accelerator):
    """The reference under ZeRO-3, as TRL prepares its reference models: an engine without optimizer."""
    import copy

    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    zero = config.setdefault("zero_optimization", {})
    if hidden:
        sizes = {
            "reduce_bucket_size": hidden * hidden,
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden,
        }
        for key, value in sizes.items():
            if zero.get(key) in (None, "auto"):
                zero[key] = value
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def _fsdp1_wrap(model, accelerator):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    plugin = accelerator.state.fsdp_plugin
    plugin.set_auto_wrap_policy(model)
    return FSDP(
        model,
        sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward,
        cpu_offload=plugin.cpu_offload,
        auto_wrap_policy=plugin.auto_wrap_policy,
        mixed_precision=plugin.mixed_precision_policy,
        sync_module_states=plugin.sync_module_states,
        use_orig_params=plugin.use_orig_params,
        param_init_fn=plugin.param_init_fn,
        limit_all_gathers=plugin.limit_all_gathers,
        device_id=accelerator.device,
    )


# --------------------------------------------------------------------------- saving a sharded model
def is_sharded(model) -> bool:
    """Whether this process's copy of `model` holds only part of the weights (FSDP1 or FSDP2)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(p, DTensor) for p in model.parameters()) or any(
        isinstance(m, FullyShardedDataParallel) for m in model.modules()
    )


def full_state_dict(model, accelerator=None) -> dict | None:
    """The whole state dict of a sharded model, on CPU in the main process; every process must call
    this (it gathers). None when the model is not sharded: each process's model holds all weights.

    FSDP1 and FSDP2: `torch.distributed.checkpoint.state_dict.get_model_state_dict` with a full state dict;
    DeepSpeed ZeRO-3: `accelerator.get_state_dict` of the engine (it needs
    `stage3_gather_16bit_weights_on_model_save: true`, as in configs/accelerate/zero3.yaml).
    """
    if accelerator is not None and zero_stage(accelerator) == 3:
        state = accelerator.get_state_dict(model)
        if is_main_process() and not state:
            raise BaldroError(
                "DeepSpeed ZeRO-3 returned no weights to save: set "
                "stage3_gather_16bit_weights_on_model_save: true in the DeepSpeed config "
                "(configs/accelerate/zero3.yaml does)"
            )
        return state
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_gather_objects(obj) -> list:
    """`obj` of every process (a list of one on a single process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
