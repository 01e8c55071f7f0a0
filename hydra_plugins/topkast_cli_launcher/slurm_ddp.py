"""`hydra/launcher=slurm_ddp`: Hydra's submitit SLURM launcher where each SLURM task of a job
is one rank of a data-parallel run (`nodes` x `tasks_per_node` ranks, one GPU each);
`hydra/launcher=local_ddp` runs the same tasks as local processes.

Every task runs the job: before it does, the task exports the rendezvous that torch.distributed
reads (MASTER_ADDR/PORT from the job's first node, RANK, WORLD_SIZE, LOCAL_RANK; submitit's
`TorchDistributedEnvironment`), and every task but rank 0 gets the overrides that keep it from
writing the run directory. A time-out requeues the whole job (submitit, on rank 0); with
`resume=auto` it continues from last.ckpt.

Hydra imports every module under `hydra_plugins` when it looks for plugins: without the
submitit plugin installed (the `launchers` extra) this one defines nothing.
"""

from __future__ import annotations

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
except ImportError:  # pragma: no cover (the extra is not installed)
    SlurmLauncher = LocalLauncher = None


def task_environment() -> list[str]:
    """In a SLURM task of a multi-task job: export the rendezvous for torch.distributed and
    return the Hydra overrides of this task's rank (none for rank 0)."""
    import submitit

    from topkast_cli.launch import rank_overrides

    job = submitit.JobEnvironment()
    if job.num_tasks == 1:
        return []
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return rank_overrides(job.global_rank)


if SlurmLauncher is not None:

    class RankTasks:
        """Each task of a job is one rank (mixed into a submitit launcher)."""

        def __call__(self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state):
            overrides = [*sweep_overrides, *task_environment()]
            return super().__call__(overrides, job_dir_key, job_num, job_id, singleton_state)

    class SlurmDDPLauncher(RankTasks, SlurmLauncher):
        """`hydra/launcher=slurm_ddp`."""

    class LocalDDPLauncher(RankTasks, LocalLauncher):
        """`hydra/launcher=local_ddp`: the same, as local processes (a workstation, tests)."""
