"""How the model is spread over the workers: ``parallel:`` of the pretrain config applied to a model.

Two data-parallel layouts:
- ``replicate``: every worker holds the whole model; ``dist.allreduce_gradients`` averages the
  grads of the parameters the step's task touched after the backward. Fastest for the tiny demo
  model on CPU (one flat all-reduce, no per-block gathers; measured, see the README).
- ``fsdp``: FSDP2 (``fully_shard``) per encoder block, per embedder, per projection and per
  classifier, and on the root for what is left (text positions, type embeddings, the final norm;
  the 0-d temperatures stay replicated: FSDP2 cannot shard scalars).
  Parameters, grads and optimizer state are sharded; a unit is gathered only when its module
  runs, so the embedders and heads of the tasks a step does not run cost no communication, and
  since every rank runs the same task the collectives line up (no deadlock). Grads are
  reduce-scattered per unit during the backward (overlapping it).

The model is called through ``encode``/``project``/``classify``/``temperature``, not ``forward``.
Only ``encode`` is registered as an FSDP forward method of the root (it gathers what the root
holds): the heads are their own units and the temperatures stay replicated, so ``project`` and
``classify`` need no root gather. Registering them would be wrong: their inputs carry grads, so
the root's post-backward hook would fire (and free the root's weights) before the encoder's backward.

``expert: N`` shards each MoE layer's experts over groups of N workers first
(``model/expert_parallel.py``, all-to-all dispatch); those shards stay outside FSDP and their
grads are averaged over the replicas here. Activation checkpointing (per block or per MoE layer)
and ``torch.compile`` (per block) come next, in place, so state-dict keys never change.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from imp_platform.config.train import ParallelConfig
from imp_platform.train.dist import allreduce_gradients, is_distributed
from imp_platform.train.optim import clip_gradients

log = logging.getLogger(__name__)

# The IMPModel method the tasks call in place of ``forward`` that uses the root's own parameters.
FORWARD_METHODS = ("encode",)


@dataclass
class Parallelism:
    """What ``apply_parallelism`` did to a model, and the gradient sync that goes with it."""

    params: list[nn.Parameter]  # the trainable parameters (DTensors where sharded)
    experts: list[nn.Parameter] = field(default_factory=list)  # expert-parallel shards, outside FSDP
    replica_group: Any = None  # the ranks holding the same experts (None: one copy of each)

    @property
    def sharded(self) -> bool:
        """Any parameter sharded (FSDP or experts): checkpoints go through DCP, eval gathers the weights."""
        return any(isinstance(p, DTensor) for p in self.params)

    def sync_and_clip(self, max_norm: float | None) -> torch.Tensor:
        """Average grads over ranks and clip them; the global norm before clipping, as a tensor (no
        host sync), the same on every rank.

        FSDP reduced its parameters' grads in the backward; the replicated ones (all of them in
        ``replicate``, the 0-d temperatures under FSDP) are all-reduced here. An expert shard's grad
        is already the sum over its expert-parallel group of every rank's loss
        (``model/expert_parallel.py``): summed over the replicas too, it is divided by the world size.
        """
        allreduce_gradients([p for p in self.params if not isinstance(p, DTensor)])
        if self.experts and is_distributed():
            for p in self.experts:
                if p.grad is not None:
                    grad = p.grad.to_local()
                    if self.replica_group is not None:
                        dist.all_reduce(grad, group=self.replica_group)
                    grad /= dist.get_world_size()
        return clip_gradients(self.params, max_norm)


def apply_parallelism(model: nn.Module, cfg: ParallelConfig, device: torch.device) -> Parallelism:
    """Expert parallelism, activation checkpointing, compile and FSDP as ``cfg`` says, in that order
    (torchtitan's), changing ``model`` in place."""
    experts, replica_group = _expert_parallel(model, cfg, device) if cfg.expert > 1 else ([], None)
    for block in model.encoder.blocks:
        if cfg.activation_checkpointing == "block":
            _checkpointed(block)
        elif cfg.activation_checkpointing == "moe_only" and block.sparse:
            _checkpointed(block.ffn)
        if cfg.compile:
            block.compile()
    if cfg.data == "fsdp":
        if _has_process_group():
            _fully_shard(model, device, ignored=set(experts))
        else:
            log.warning("parallel.data=fsdp without a process group (local mode): the model stays unsharded")
    return Parallelism([p for p in model.parameters() if p.requires_grad], experts, replica_group)


def _has_process_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def _checkpointed(module: nn.Module) -> None:
    """Recompute ``module``'s forward in the backward instead of keeping its activations."""
    inner = module.forward

    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    module.forward = forward


def _expert_parallel(model: nn.Module, cfg: ParallelConfig, device: torch.device) -> tuple[list[nn.Parameter], Any]:
    """Shard each MoE layer's experts over groups of ``cfg.expert`` workers (``model/expert_parallel.py``);
    (the expert shards, the process group of the ranks that hold the same ones)."""
    from imp_platform.config import ConfigError

    world = dist.get_world_size() if _has_process_group() else 1
    if world % cfg.expert:
        raise ConfigError(f"parallel.expert={cfg.expert} must divide the worker count ({world})")
    try:
        from imp_platform.model.expert_parallel import shard_experts
    except ImportError as exc:
        raise ConfigError(f"parallel.expert={cfg.expert}: expert parallelism is not available ({exc})") from None
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world // cfg.expert, cfg.expert), mesh_dim_names=("replica", "expert"))
    before = {id(p) for p in model.parameters()}
    shard_experts(model, mesh["expert"])
    experts = [p for p in model.parameters() if id(p) not in before]
    return experts, mesh["replica"].get_group() if world > cfg.expert else None


def _fully_shard(model: nn.Module, device: torch.device, ignored: set[nn.Parameter]) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # bf16 compute with fp32 grad reduction on GPU; CPU stays fp32 (bf16 matmuls are slower there).
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if device.type == "cuda" else MixedPrecisionPolicy())
    # FSDP2 cannot shard 0-d parameters (the NCE temperatures): they stay replicated, averaged
    # by ``sync_and_clip`` like the replicated path's; so do expert shards (sharded already).
    ignored = ignored | {p for p in model.parameters() if p.ndim == 0}
    for unit in _units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy, ignored_params=ignored)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=ignored, reshard_after_forward=False)
    for name in FORWARD_METHODS:
        register_fsdp_forward_method(model, name)


def _units(model: nn.Module) -> list[nn.Module]:
    """Modules gathered on their own: blocks (always run) and the per-modality / per-task input and output layers."""
    embed, heads = model.embed, model.heads
    inputs = [*embed.stems(), embed.positions]
    decoder = [model.decoder] if getattr(model, "decoder", None) is not None else []  # captioning runs it outside encode
    return [*model.encoder.blocks, *inputs, *heads.projections.values(), *heads.classifiers.values(), *decoder]


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """FSDP: reduce grads in this backward (the last micro-batch of a step) or keep accumulating locally."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def local(tensors: Iterable[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """This rank's shard of each (DTensor) tensor; plain tensors as they are (debug digests)."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model state on CPU on rank 0 (every rank must call it; others get ``{}``).

    For a replicated model: its own state dict, no collective.
    """
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
