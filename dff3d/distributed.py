"""Several processes (hosts) as one JAX program: JAX's multi-controller runtime.

Every process runs the same code: `initialize` (before anything touches devices) joins the
processes through jax.distributed; afterwards jax.devices() lists every process's devices,
one Mesh spans them all, each process loads its own slice of every global batch and
`global_batch` assembles the slices into one jax.Array sharded over the global mesh
(jax.make_array_from_process_local_data). Only process 0 writes logs and configs
(`is_primary`); checkpoints are written by all processes together (Orbax).

On CPU, collectives across processes need an implementation: gloo, set here before the
backend starts. On TPU pods, and under SLURM or any cluster that JAX recognises,
jax.distributed.initialize() finds the coordinator itself (`initialize(auto=True)`).
"""

import os
from typing import Optional

import jax
import numpy as np

# Environment variables that say a JAX-recognised cluster launched this process with peers.
_CLUSTER_HINTS = (("SLURM_NTASKS", lambda v: int(v) > 1),
                  ("OMPI_COMM_WORLD_SIZE", lambda v: int(v) > 1),
                  ("TPU_WORKER_HOSTNAMES", lambda v: "," in v),
                  ("MEGASCALE_COORDINATOR_ADDRESS", bool))


def cluster_detected(environ=None) -> bool:
  """True when the environment shows a multi-process launch JAX can initialise itself."""
  environ = os.environ if environ is None else environ
  for name, test in _CLUSTER_HINTS:
    value = environ.get(name)
    try:
      if value and test(value):
        return True
    except ValueError:
      continue
  return False


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, auto: bool = True) -> bool:
  """Join the other processes of this job; call before anything touches devices.

  Args:
    coordinator_address: "host:port" of process 0 (all processes pass the same); with
      num_processes and process_id this is the explicit form (e.g. two processes on localhost).
    auto: without an address, initialise when cluster_detected() (SLURM, MPI, TPU pods).
  Returns:
    True when running as several processes.
  Raises:
    ValueError: an address without num_processes / process_id, or an out-of-range id.
  """
  if coordinator_address is None and not (auto and cluster_detected()):
    return False
  if coordinator_address is not None:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id {process_id} is not in [0, {num_processes})")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return jax.process_count() > 1


def is_primary() -> bool:
  """True on process 0: the one that prints, logs and writes configs."""
  return jax.process_index() == 0


def local_batch_size(global_batch_size: int) -> int:
  """This process's rows of a global batch; ValueError when it does not divide."""
  n = jax.process_count()
  if global_batch_size % n:
    raise ValueError(f"batch_size {global_batch_size} must divide over {n} processes")
  return global_batch_size // n


def global_batch(local: dict, sharding) -> dict:
  """{key: (B_local, ...) numpy} of this process -> {key: (B, ...) jax.Array} over the global
  mesh (`sharding` splits the first axis); process p's rows are rows p * B_local onwards."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def any_process(flag: bool, after=None) -> bool:
  """True when `flag` is true on any process (every process must call it: a stop request
  or a time limit seen by one process stops all of them at the same step).

  after: a pytree of arrays (the training state) whose computation must finish first: its
  collectives (the gradient all-reduce) then complete on every process before this one
  starts. Without it, an asynchronously dispatched step and this all-gather could reach the
  two processes' gloo transports in different orders (seen on this CPU: a 'collective
  mismatch' abort at step 15 of a two-process run under load).
  """
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if after is not None:
    jax.block_until_ready(after)
  flags = multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))
  return bool(np.any(flags))


def barrier(name: str) -> None:
  """Wait until every process gets here (no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
