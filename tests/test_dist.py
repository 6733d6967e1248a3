"""workshop.dist: one DistEnv for each way a process can be launched, from its variables."""

import os

import pytest
import torch

from helpers import on_ranks
from workshop import dist
from workshop.base import world

HOSTS = {"n[1-2]": ["n1", "n2"], "n1": ["n1"], "gpu[017,018]": ["gpu017", "gpu018"]}.__getitem__


def detect(env, cuda_count=0):
    return dist.detect(environ=env, cuda_count=cuda_count, hostnames=HOSTS)


def test_one_process_without_launcher():
    e = detect({})
    assert (e.rank, e.world_size, e.launcher, e.device, e.backend) == (0, 1, "single", "cpu", "gloo")
    assert e.is_main and not e.is_distributed


def test_torchrun_variables():
    e = detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
                "MASTER_ADDR": "node7", "MASTER_PORT": "29400"})
    assert (e.rank, e.local_rank, e.world_size, e.local_world_size, e.node_rank) == (3, 1, 4, 2, 1)
    assert (e.master_addr, e.master_port, e.launcher, e.num_nodes) == ("node7", 29400, "torchrun", 2)


def slurm_step(procid, localid, nodeid, job="4242", step="0", ntasks=4, per_node="2(x2)", nodes="gpu[017,018]"):
    return {"SLURM_JOB_ID": job, "SLURM_STEP_ID": step, "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid),
            "SLURM_NODEID": str(nodeid), "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_NTASKS": str(ntasks),
            "SLURM_STEP_TASKS_PER_NODE": per_node, "SLURM_STEP_NODELIST": nodes, "SLURM_JOB_NODELIST": nodes}


def test_slurm_step_with_several_tasks_is_a_world():
    e = detect(slurm_step(procid=3, localid=1, nodeid=1), cuda_count=2)
    assert (e.rank, e.local_rank, e.world_size, e.local_world_size, e.node_rank) == (3, 1, 4, 2, 1)
    assert (e.launcher, e.master_addr, e.job_id) == ("slurm", "gpu017", "4242")
    assert (e.device, e.backend) == ("cuda:1", "nccl")


def test_an_uneven_slurm_layout_is_described_as_it_is():
    """sbatch --ntasks=3 on two nodes: 2 tasks on the first, 1 on the second."""
    e = detect({**slurm_step(2, 0, 1, ntasks=3, per_node="2,1"), "SLURM_STEP_NUM_NODES": "2"})
    assert (e.world_size, e.local_world_size, e.num_nodes, e.even_layout) == (3, 2, 2, False)
    assert dist.describe(e).startswith("3 rank(s) on 2 node(s), unevenly (2 on the first), started by srun")
    even = detect({**slurm_step(3, 1, 1), "SLURM_STEP_NUM_NODES": "2"})
    assert (even.num_nodes, even.even_layout) == (2, True)
    assert dist.describe(even).startswith("4 rank(s) on 2 node(s), 2 per node, started by srun")


def test_slurm_ranks_agree_on_the_rendezvous():
    envs = [detect(slurm_step(procid=r, localid=r % 2, nodeid=r // 2)) for r in range(4)]
    assert len({(e.master_addr, e.master_port) for e in envs}) == 1
    assert [e.rank for e in envs] == [0, 1, 2, 3]


def test_two_jobs_on_one_node_get_different_ports():
    ports = {detect(slurm_step(0, 0, 0, job=str(job))).master_port for job in range(1000, 1100)}
    assert len(ports) == 100
    assert all(world.PORT_BASE <= p < world.PORT_BASE + world.PORT_SPAN for p in ports)


def test_explicit_port_overrides_the_derived_one():
    e = detect({**slurm_step(0, 0, 0), "WORKSHOP_MASTER_PORT": "31000"})
    assert e.master_port == 31000


def test_explicit_address_overrides_the_first_node():
    e = detect({**slurm_step(2, 0, 1), "WORKSHOP_MASTER_ADDR": "gpu017-ib"})
    assert (e.master_addr, e.master_port) == ("gpu017-ib", detect(slurm_step(2, 0, 1)).master_port)
    assert detect({**slurm_step(2, 0, 1), "WORKSHOP_MASTER_ADDR": ""}).master_addr == "gpu017"


def test_batch_script_step_is_one_process():
    # sbatch --nodes=2 --ntasks-per-node=2: the batch script itself has SLURM variables, no step
    e = detect({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_NODEID": "0",
                "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_LOCALID": "0"})
    assert (e.world_size, e.launcher, e.job_id) == (1, "single", "77")


def test_jupyterlab_server_started_as_a_job_is_one_process():
    # a portal's JupyterLab: the server runs in the batch step (or one srun task) of a job
    portal = {"SLURM_JOB_ID": "88", "SLURM_JOB_NAME": "sys/dashboard/jupyter", "SLURM_NTASKS": "1",
              "SLURM_JOB_NODELIST": "n1", "SLURM_CPUS_PER_TASK": "8"}
    assert detect(portal).world_size == 1
    one_task_step = {**portal, "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}
    assert detect(one_task_step).world_size == 1


def test_torchrun_inside_a_slurm_job_wins():
    e = detect({**slurm_step(0, 0, 0, ntasks=2), "RANK": "1", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                "MASTER_ADDR": "a", "MASTER_PORT": "1234"})
    assert (e.launcher, e.rank, e.world_size) == ("torchrun", 1, 8)


def test_the_backend_is_the_devices_unless_workshop_backend_says_otherwise():
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    assert detect(torchrun, cuda_count=2).backend == "nccl" and detect(torchrun).backend == "gloo"
    gloo_on_gpus = detect({**torchrun, "WORKSHOP_BACKEND": "gloo"}, cuda_count=2)
    assert (gloo_on_gpus.device, gloo_on_gpus.backend) == ("cuda:0", "gloo")


def test_device_per_local_rank():
    assert detect({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, cuda_count=4).device == "cuda:1"
    # GPUs bound per process (CUDA_VISIBLE_DEVICES=$LOCAL_RANK in a wrapper): every rank sees one GPU, its own
    one_each = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "1"}
    assert detect(one_each, cuda_count=1).device == "cuda:0"
    with pytest.raises(RuntimeError, match="runs 4 tasks but has 2 GPU.s. .2 visible.: local ranks 2 to 3 would have"):
        detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}, cuda_count=2)
    with pytest.raises(RuntimeError, match="local rank 1 would have none of its own"):  # two ranks, one GPU
        detect({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, cuda_count=1)


def test_init_and_cleanup_are_safe_twice(clean_env):
    e1 = dist.init()
    e2 = dist.init()
    assert e1 == e2 and e1.world_size == 1
    dist.cleanup()
    dist.cleanup()
    assert not torch.distributed.is_initialized()


def test_print0_prints_on_rank_0_only(clean_env, capsys, monkeypatch):
    dist.print0("hello")
    assert capsys.readouterr().out == "hello\n"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    dist.print0("hello")
    assert capsys.readouterr().out == ""


def test_trainer_in_a_portal_job_is_one_process(clean_env, monkeypatch, tmp_path):
    """Lightning alone would read a JupyterLab server's SLURM variables as a 4-task world."""
    for key, value in {"SLURM_JOB_ID": "99", "SLURM_NTASKS": "4", "SLURM_JOB_NAME": "jupyter",
                       "SLURM_NODELIST": "n1", "SLURM_JOB_NODELIST": "n1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                       "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    trainer = dist.make_trainer(dist.detect(), max_epochs=1, logger=False, default_root_dir=tmp_path)
    assert trainer.world_size == 1 and trainer.global_rank == 0
    assert type(trainer.strategy).__name__ == "SingleDeviceStrategy"


def test_trainer_sees_the_launchers_world():
    env = dist.DistEnv(rank=3, local_rank=1, world_size=4, local_world_size=2, node_rank=1, launcher="slurm")
    trainer = dist.make_trainer(env, max_epochs=1, logger=False)
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank, trainer.num_nodes) == (4, 3, 1, 1, 2)
    # every step logged: runs of tens of steps would otherwise log none, and Lightning warns on stderr
    assert trainer.log_every_n_steps == 1
    assert dist.make_trainer(env, max_epochs=1, logger=False, log_every_n_steps=10).log_every_n_steps == 10


def test_lightning_builds_ddp_in_a_kernel_that_is_one_rank_and_counts_an_uneven_layout_as_one_node(monkeypatch):
    """Notebook 05's L.Trainer(...) in the open: in a kernel Lightning refuses DDP (it would start the processes
    itself) unless built inside dist.lightning_in_kernel(); the plugin gives it the rank."""
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.trainer.connectors import accelerator_connector

    monkeypatch.setattr(accelerator_connector, "_IS_INTERACTIVE", True)  # as in JupyterLab or papermill
    env = dist.DistEnv(rank=1, local_rank=1, world_size=2, local_world_size=2, launcher="torchrun")
    devices, num_nodes = dist.lightning_layout(env)
    kwargs = dict(accelerator="cpu", devices=devices, num_nodes=num_nodes, strategy="ddp", logger=False,
                  plugins=[dist.lightning_environment(env)])
    with pytest.raises(MisconfigurationException, match="interactive"):
        L.Trainer(**kwargs)
    with dist.lightning_in_kernel():
        trainer = L.Trainer(**kwargs)
    assert (trainer.world_size, trainer.global_rank, type(trainer.strategy).__name__) == (2, 1, "DDPStrategy")
    assert accelerator_connector._IS_INTERACTIVE  # the patch lasted only while the Trainer was built
    uneven = dist.DistEnv(rank=2, world_size=3, local_world_size=2, nodes=2, launcher="slurm")  # --ntasks=3, 2 nodes
    assert dist.lightning_layout(uneven) == (3, 1) and dist.lightning_layout(env) == (2, 1)


def test_one_process_gets_a_group_of_one(clean_env):
    dist.init()
    t = torch.ones(3)
    torch.distributed.all_reduce(t)  # the same cell runs on 1 rank and on N
    assert torch.distributed.get_world_size() == 1 and torch.equal(t, torch.ones(3))
    dist.cleanup()


def test_the_process_group_is_left_at_exit_without_cleanup():
    """A process that never calls dist.cleanup() leaves its group before interpreter finalization (atexit handlers
    run last-registered first: the probe registered before init runs after the cleanup). The first group is made by
    hand and adopted (notebook 05), the second by init; and importing workshop.dist imports torch._dynamo, before
    any group (why: there)."""
    import subprocess
    import sys

    code = ("import atexit, sys, torch.distributed as t\n"
            "atexit.register(lambda: print('group alive at exit:', t.is_initialized()))\n"
            "from workshop import dist\n"
            "print('torch._dynamo before any group:', 'torch._dynamo' in sys.modules)\n"
            "t.init_process_group(backend='gloo', store=t.HashStore(), rank=0, world_size=1)\n"
            "dist.init()\n"
            "dist.cleanup()\n"
            "dist.init()\n"
            "print('group alive after init:', t.is_initialized())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=world.without_launcher())
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["torch._dynamo before any group: True", "group alive after init: True",
                                       "group alive at exit: False"]


def test_a_group_made_by_hand_is_adopted_and_a_world_of_one_still_works(clean_env):
    """Notebook 05 joins with init_process_group in a cell (a world of one: a HashStore, no port), then dist.init
    adopts the group: the same group, once."""
    env = dist.detect()
    torch.distributed.init_process_group(backend=env.backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        group = torch.distributed.group.WORLD
        assert dist.init(env) == env and dist.init() == env and dist.get_env() == env
        assert torch.distributed.group.WORLD is group
        t = torch.ones(3)
        torch.distributed.all_reduce(t)
        assert torch.equal(t, torch.ones(3))
    finally:
        dist.cleanup()
    assert not torch.distributed.is_initialized()
    assert dist.init().world_size == 1 and torch.distributed.is_initialized()  # with no group, init makes one
    dist.cleanup()


def test_a_group_of_ranks_made_by_hand_is_adopted_with_the_launchers_variables(clean_env):
    """Rank 1 of 2 (torch's fake backend: a group with no peer, nothing sent): adopted, its backend taken, torchrun's
    variables written for the libraries that read them and put back by cleanup; a group of another world refused."""
    from dataclasses import replace

    from torch.testing._internal.distributed.fake_pg import FakeStore

    env = dist.DistEnv(rank=1, local_rank=1, world_size=2, local_world_size=2, master_addr="n1", master_port=29400,
                       launcher="slurm")
    torch.distributed.init_process_group(backend="fake", store=FakeStore(), rank=1, world_size=2)
    try:
        with pytest.raises(RuntimeError, match=r"is rank 1 of 2, but the launcher \(slurm\) started rank 3 of 4"):
            dist.init(replace(env, rank=3, world_size=4))
        assert "RANK" not in os.environ
        assert dist.init(env) == replace(env, backend="fake")
        assert [os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")] == \
            ["1", "2", "1", "n1", "29400"]
    finally:
        dist.cleanup()
    assert not torch.distributed.is_initialized() and "RANK" not in os.environ and "MASTER_ADDR" not in os.environ


@pytest.mark.multirank
def test_cleanup_ends_the_gloo_threads_after_ddp(tmp_path):
    threads = on_ranks("cleanup_ends_gloo_threads.py", tmp_path / "threads.pt")
    gloo = [name for name in threads["during"] if "gloo" in name]
    assert gloo, threads  # the group's worker and transport threads ran
    assert not [name for name in threads["after"] if "gloo" in name], threads


def test_local_ranks_start_under_torchrun_without_the_surrounding_launcher():
    cmd, env = world.local_ranks(2, "workshop.launch.doctor", "--timeout", "5", run="module",
                                 environ={"SLURM_JOB_ID": "7", "RANK": "3", "MASTER_PORT": "1", "PATH": "/bin"})
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                       "workshop.launch.doctor", "--timeout", "5"]
    assert env == {"PATH": "/bin"}
    with pytest.raises(ValueError, match="at least 1"):
        world.local_ranks(0, "x.py")


def test_the_rank_read_cheaply_follows_the_world_rule():
    batch_step = {"SLURM_JOB_ID": "5", "SLURM_PROCID": "0", "SLURM_STEP_ID": "batch"}
    srun_step = {"SLURM_JOB_ID": "5", "SLURM_PROCID": "3", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4"}
    assert [world.rank(e) for e in ({}, batch_step, srun_step, {"RANK": "2", "WORLD_SIZE": "4", **srun_step})] \
        == [0, 0, 3, 2]
    assert [world.launcher(e) for e in ({}, batch_step, srun_step)] == ["single", "single", "slurm"]


def test_the_launcher_counts_the_tasks_srun_will_start_and_reads_the_timeout():
    assert world.srun_tasks({"SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "2"}) == 4
    assert world.srun_tasks({"SLURM_JOB_NUM_NODES": "2"}) == 2  # sbatch --nodes=2 alone: one task per node
    assert world.srun_tasks({}) == 1
    assert world.timeout_s({}) == world.DEFAULT_TIMEOUT_S and world.timeout_s({"WORKSHOP_DIST_TIMEOUT": "12"}) == 12
    for bad in ("10m", "0", "-3", "inf", "nan"):
        with pytest.raises(ValueError, match="a number above 0"):
            world.timeout_s({"WORKSHOP_DIST_TIMEOUT": bad})
