"""Processes and the device mesh.

On a multi-host slice :func:`initialize` calls ``jax.distributed.initialize()`` before
anything touches a device: on Cloud TPU and on SLURM / Open MPI clusters JAX finds the
coordinator itself; elsewhere set ``MEDGEMMA_COORDINATOR=host:port``,
``MEDGEMMA_NUM_PROCESSES`` and ``MEDGEMMA_PROCESS_ID`` (or JAX's own ``JAX_COORDINATOR_ADDRESS``
etc.). A single process needs none of it.
"""

from __future__ import annotations

import os

__all__ = ["batch_sharding", "build_mesh", "initialize", "multi_host_env"]

_STARTED = False

#: Variables that mean "this is one process of several".
_MULTI = ("MEDGEMMA_COORDINATOR", "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES",
          "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def multi_host_env() -> bool:
    if os.environ.get("MEDGEMMA_COORDINATOR") or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts:
        return True
    for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(os.environ.get(key, "1") or 1) > 1:
            return True
    return False


def initialize() -> tuple[int, int]:
    """``jax.distributed.initialize()`` when the environment says several processes (once);
    returns ``(process_index, process_count)``."""
    global _STARTED
    import jax

    if multi_host_env() and not _STARTED:
        kw = {}
        if os.environ.get("MEDGEMMA_COORDINATOR"):
            kw = dict(coordinator_address=os.environ["MEDGEMMA_COORDINATOR"],
                      num_processes=int(os.environ["MEDGEMMA_NUM_PROCESSES"]),
                      process_id=int(os.environ["MEDGEMMA_PROCESS_ID"]))
            if os.environ.get("JAX_PLATFORMS", "") == "cpu":
                jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**kw)
        _STARTED = True
    return jax.process_index(), jax.process_count()


def build_mesh(spec: str):
    """The ``(data, fsdp, tensor)`` mesh of ``spec`` over every device of every process."""
    from medgemma_core.sharding import make_mesh

    return make_mesh(spec)


def batch_sharding(mesh, batch: int, ndim: int):
    """The sharding of a ``[A, B, ...]`` step array: ``B`` over the mesh's batch axes."""
    from jax.sharding import NamedSharding, PartitionSpec

    from medgemma_core.sharding import logical_to_mesh

    spec = logical_to_mesh(("batch",), mesh, (batch,))
    del ndim
    return NamedSharding(mesh, PartitionSpec(None, *spec))
