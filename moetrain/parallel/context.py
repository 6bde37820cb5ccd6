"""The process layout of a run: rank, world, device, process groups, and the collective helpers.

One process (``python``) gives a context of world size 1 whose collectives are
no-ops; under ``torchrun`` the default process group is initialised from the
environment (env:// rendezvous, one or many nodes).

Layout (docs/parallelism.md), W ranks and expert-parallel size ``ep``:

- data parallel (DP): all W ranks (the default group); every rank reads its own
  slice of the global batch.
- expert parallel (EP): ``W / ep`` groups of ``ep`` *contiguous* ranks
  ``[g * ep, (g + 1) * ep)``, so with ``ep <= ranks per node`` the all-to-all
  traffic stays inside a node. EP rank ``k`` of a group holds experts
  ``[k * N / ep, (k + 1) * N / ep)``.
- expert data parallel (EDP): the ``W / ep`` ranks holding the same expert
  shard, ``{k, k + ep, k + 2 ep, ...}``; expert gradients are summed over it.

With pipeline parallelism (``parallel.pp = P``, docs/pipeline.md) the mesh gains an outermost ``"pp"``
dimension, shape ``(P, W / P / ep, ep)`` named ``("pp", "edp", "ep")``: pipeline rank ``p`` holds the ranks
``[p * W / P, (p + 1) * W / P)``, and a stage's EP and EDP groups lie within them (:meth:`ParallelContext.stage_view`).
Without PP, the groups come from one two-dimensional :class:`~torch.distributed.device_mesh.DeviceMesh` of shape
``(W / ep, ep)`` with named dimensions ``("edp", "ep")``: row ``g`` is EP group ``g`` (contiguous ranks), column
``k`` the EDP group of shard ``k`` (strided ranks); the data-parallel units (:mod:`moetrain.parallel.data_parallel`)
reduce the non-expert part over the two flattened (``"dp"``, all W ranks) and the experts over ``"edp"``,
torchtitan's layout. The
mesh and its groups live on the context object that is passed explicitly (no module globals), like
torchtitan's ``ParallelDims``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moetrain.config import ConfigError, ParallelConfig, ep_layout_error


@dataclass
class ParallelContext:
    """Rank, world, device and the DP / EP / EDP process groups of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    ep_size: int = 1
    """Ranks an MoE layer's experts are split over."""
    ep_group: Any = None
    """This rank's expert-parallel group (``None`` when ``ep_size == 1``)."""
    edp_group: Any = None
    """This rank's expert-data-parallel group (``None`` when it is this rank alone)."""
    mesh: DeviceMesh | None = None
    """The ``("edp", "ep")`` device mesh over all W ranks (``("pp", "edp", "ep")`` with PP; ``None`` on one
    process)."""
    pp_size: int = 1
    """Pipeline ranks (``parallel.pp``): the W ranks are ``pp_size`` blocks of ``W / pp_size`` data-parallel ones."""
    pp_group: Any = None
    """This rank's pipeline group (the ``pp_size`` ranks holding the stages of one pipeline); ``None`` without PP."""
    group: Any = None
    """The group the collective helpers span when given none: ``None`` is the default group (all W ranks); a
    :meth:`stage_view`'s is its stage's data-parallel ranks."""
    _groups: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def ep_rank(self) -> int:
        """Position of this rank in its EP group (which expert shard it holds)."""
        return self.rank % self.ep_size

    @property
    def edp_size(self) -> int:
        """Ranks holding the same expert shard of a layer (``W / pp / ep``)."""
        return self.dp_size // self.ep_size

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks holding each pipeline stage (``W / pp``; all W without PP)."""
        return self.world_size // self.pp_size

    @property
    def dp_rank(self) -> int:
        """This rank's place among the ranks of its stage: which slice of the global batch it reads."""
        return self.rank % self.dp_size

    @property
    def pp_rank(self) -> int:
        """This rank's place in its pipeline (which stages it holds)."""
        return self.rank // self.dp_size

    def stage_view(self) -> ParallelContext:
        """The context of this rank's pipeline stage as data parallelism sees it: rank ``dp_rank`` of the
        ``dp_size`` ranks holding the stage, the mesh's ``("edp", "ep")`` part for this pipeline rank, the
        collectives over those ranks only; ``pp_group`` kept (the gradient norm sums over the stages). Itself
        without PP."""
        if self.pp_size == 1:
            return self
        dp_mesh = self.mesh["edp", "ep"] if self.mesh is not None else None
        group = dp_mesh._flatten("dp").get_group() if dp_mesh is not None and self.dp_size > 1 else None
        return ParallelContext(
            rank=self.dp_rank,
            world_size=self.dp_size,
            local_rank=self.local_rank,
            device=self.device,
            backend=self.backend,
            ep_size=self.ep_size,
            ep_group=self.ep_group,
            edp_group=self.edp_group,
            mesh=dp_mesh,
            pp_group=self.pp_group,
            group=group,
        )

    @property
    def ep_ranks(self) -> list[int]:
        """Global ranks of this rank's EP group, in EP-rank order."""
        start = self.rank - self.ep_rank
        return list(range(start, start + self.ep_size))

    def all_reduce_sum(self, t: torch.Tensor, group: Any = None) -> torch.Tensor:
        """Sum over all ranks (or ``group``), in place (identity on one process)."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group if group is not None else self.group)
        return t

    def all_reduce_max(self, t: torch.Tensor, group: Any = None) -> torch.Tensor:
        """Maximum over all ranks (or ``group``), in place (identity on one process)."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group if group is not None else self.group)
        return t

    def all_reduce_flat(self, tensors: list[torch.Tensor], op: str = "sum", group: Any = None) -> list[torch.Tensor]:
        """``tensors`` (one dtype, one device) summed (``op="sum"``) or maximised (``"max"``) over all ranks (or
        ``group``) in one all-reduce of them flattened together; returns views of the result, each shaped as its
        input (scalars stay 0-d). The inputs themselves on one process."""
        if not self.distributed or not tensors:
            return tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        self.all_reduce_max(flat, group) if op == "max" else self.all_reduce_sum(flat, group)
        out, offset = [], 0
        for t in tensors:
            out.append(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        return out

    def host_group(self, name: str) -> Any:
        """A CPU gloo group over all ranks for host-side collectives (checkpoint publishing, the stop vote)
        that must not interleave with the training ones; made on first use by every rank in the same order,
        then cached by ``name``. ``None`` on one process."""
        return self._own_group(f"host/{name}", "gloo")

    def _own_group(self, key: str, backend: str | None) -> Any:
        if not (self.distributed and dist.is_initialized()):
            return None
        if key not in self._groups:
            self._groups[key] = dist.new_group(backend=backend)
        return self._groups[key]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_object(self, obj: object, src: int = 0) -> object:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but no CUDA device is available")
        index = local_rank % torch.cuda.device_count()  # several gloo ranks may share one GPU
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def resolve_backend(requested: str, device: torch.device) -> str:
    """``auto``: NCCL on GPUs, gloo on CPU. ``gloo`` on GPUs lets several ranks share one device (smoke runs);
    the dispatcher then routes its all-to-alls through host memory."""
    if requested != "auto":
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


def check_layout(world_size: int, ep: int, num_experts: int | None = None) -> None:
    """Raise one :class:`ConfigError` line when W, ``parallel.ep`` and ``num_experts`` do not divide."""
    error = ep_layout_error(world_size, ep, num_experts)
    if error:
        raise ConfigError(error)


def build_mesh(device_type: str, world_size: int, ep: int, pp: int = 1) -> DeviceMesh:
    """The ``(W / ep, ep)`` mesh named ``("edp", "ep")``, or with ``pp > 1`` the ``(pp, W / pp / ep, ep)`` one
    named ``("pp", "edp", "ep")`` (every rank must call this, in the same order)."""
    check_layout(world_size // pp, ep)
    if pp == 1:
        return init_device_mesh(device_type, (world_size // ep, ep), mesh_dim_names=("edp", "ep"))
    return init_device_mesh(device_type, (pp, world_size // pp // ep, ep), mesh_dim_names=("pp", "edp", "ep"))


def mesh_groups(mesh: DeviceMesh) -> tuple[Any, Any]:
    """This rank's (EP, EDP) process groups from the mesh; ``None`` for a dimension of size 1."""
    ep_group = mesh.get_group("ep") if mesh["ep"].size() > 1 else None
    edp_group = mesh.get_group("edp") if mesh["edp"].size() > 1 else None
    return ep_group, edp_group


def elastic_store_needed() -> bool:
    """True under ``torchrun``, whose workers share the agent's TCPStore."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def elastic_store(world_size: int) -> Any:
    """Under ``torchrun`` (agent store), the store with its keys prefixed by the restart attempt.

    A restarted job (``--max-restarts``) reuses the agent's TCPStore, whose keys
    from the failed attempt are still there; sub-groups made with
    ``dist.new_group`` (same names in every attempt) would read the dead ranks'
    addresses and fail to connect. ``None`` (env:// as usual) outside torchrun.
    """
    if not elastic_store_needed():
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, use_libuv=True
    )
    return dist.PrefixStore(f"moetrain/attempt_{attempt}/", store)


def init_parallel(cfg: ParallelConfig, device: str = "auto", num_experts: int | None = None) -> ParallelContext:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), start the process group, build the groups.

    The backend is ``parallel.backend`` (``auto`` = NCCL on GPU, gloo on CPU); a
    group that is already initialised (tests) is reused.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    check_layout(world // cfg.pp, cfg.ep, num_experts)
    dev = resolve_device(device, local_rank)
    backend = None
    ep_group = edp_group = mesh = pp_group = None
    if world > 1:
        backend = resolve_backend(cfg.backend, dev)
        if not dist.is_initialized():
            dist.init_process_group(
                backend=backend,
                device_id=dev if backend == "nccl" else None,
                store=elastic_store(world),
                rank=rank if elastic_store_needed() else -1,
                world_size=world if elastic_store_needed() else -1,
            )
        backend = dist.get_backend()
        mesh = build_mesh(dev.type, world, cfg.ep, cfg.pp)
        ep_group, edp_group = mesh_groups(mesh)
        pp_group = mesh.get_group("pp") if cfg.pp > 1 else None
    return ParallelContext(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        device=dev,
        backend=backend,
        ep_size=cfg.ep,
        ep_group=ep_group,
        edp_group=edp_group,
        mesh=mesh,
        pp_size=cfg.pp,
        pp_group=pp_group,
    )
