"""The layouts students get wrong, each said in one line that names the #SBATCH option to change, before training
starts (`workshop.base.world.layout`; workshop.dist says it on every rank, the doctor and `python -m
workshop.launch.preflight` too). Environment dictionaries only: SLURM's variables for a step as srun sets them, the
GPUs as CUDA_VISIBLE_DEVICES shows them (the local cluster's placeholder GPUs show them the same way, without CUDA)."""

import socket

import pytest

from workshop import dist
from workshop.base import world

HOSTS = {"gpu[017-018]": ["gpu017", "gpu018"], "gpu017": ["gpu017"], "n[1-2]": ["n1", "n2"]}.__getitem__


def step(procid=1, localid=1, nodeid=0, ntasks=2, per_node="2", nodes="gpu017", num_nodes=1, **extra) -> dict:
    """The variables srun gives one task of a step."""
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid),
            "SLURM_NODEID": str(nodeid), "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_STEP_TASKS_PER_NODE": per_node,
            "SLURM_STEP_NODELIST": nodes, "SLURM_JOB_NODELIST": nodes, "SLURM_STEP_NUM_NODES": str(num_nodes),
            "SLURM_JOB_NUM_NODES": str(num_nodes), "SLURMD_NODENAME": nodes.split("[")[0] if "[" not in nodes else
            HOSTS(nodes)[nodeid], **extra}


def no_dns(host):
    raise AssertionError(f"{host} resolved, but a layout on one node needs no name resolved")


def layout(env, cuda_count=None, resolve=no_dns, hostname=lambda: "login1", cpus=8, backend=None):
    return world.layout(env, cuda_count=cuda_count, hostnames=HOSTS, resolve=resolve, hostname=hostname, cpus=cpus,
                        backend=backend)


def test_one_gpu_per_task_is_said_with_the_options_that_give_each_rank_the_nodes_gpus():
    """--gpus-per-task=1 (Lightning#16828): workshop.dist takes cuda:0, and says why set_device(LOCAL_RANK) fails."""
    (found,) = layout(step(CUDA_VISIBLE_DEVICES="1", SLURM_GPUS_ON_NODE="2"))
    assert not found.fatal
    assert found.text.startswith("gpu017: each of its 2 tasks sees one GPU (CUDA_VISIBLE_DEVICES=1 here): SLURM binds")
    assert found.text.endswith("ask for #SBATCH --gpus-per-node=2 with --ntasks-per-node=2 instead")
    assert dist.detect(step(CUDA_VISIBLE_DEVICES="1", SLURM_GPUS_ON_NODE="2"), cuda_count=1, hostnames=HOSTS).device == \
        "cuda:0"


def test_gpus_split_between_tasks_by_gpu_bind_are_refused_on_gpus():
    """--gpu-bind=closest: 4 tasks, each sees 2 of the node's 4 GPUs (Lightning#13605)."""
    env = step(procid=2, localid=2, ntasks=4, per_node="4", CUDA_VISIBLE_DEVICES="2,3", SLURM_GPUS_ON_NODE="4")
    (found,) = layout(env)
    assert found.fatal and found.gpu
    assert "sees 2 of the node's 4 GPUs (CUDA_VISIBLE_DEVICES=2,3 here)" in found.text
    assert found.text.endswith("drop --gpu-bind and ask for #SBATCH --gpus-per-node=4 with --ntasks-per-node=4")
    with pytest.raises(RuntimeError, match="SLURM split them between the tasks"):
        dist.detect(env, cuda_count=2, hostnames=HOSTS)


@pytest.mark.parametrize("tasks, visible, on_node, says", [
    (4, "0,1", "2", "gpu017 runs 4 tasks but has 2 GPU(s) (CUDA_VISIBLE_DEVICES=0,1): local ranks 2 to 3 would have "
                    "none of its own; ask for one task per GPU, #SBATCH --ntasks-per-node=2 (or --gpus-per-node=4)"),
    (2, "0", "1", "gpu017 runs 2 tasks but has 1 GPU(s) (CUDA_VISIBLE_DEVICES=0): local rank 1 would have none of its "
                  "own; ask for one task per GPU, #SBATCH --ntasks-per-node=1 (or --gpus-per-node=2)"),
], ids=["4 tasks, 2 GPUs", "2 tasks share 1 GPU"])
def test_more_tasks_per_node_than_gpus_is_refused_on_gpus_and_said_on_cpu(tasks, visible, on_node, says, capsys):
    env = step(procid=tasks - 1, localid=tasks - 1, ntasks=tasks, per_node=str(tasks), CUDA_VISIBLE_DEVICES=visible,
               SLURM_GPUS_ON_NODE=on_node)
    assert layout(env) == [world.Finding(says, fatal=True, gpu=True)]
    with pytest.raises(RuntimeError, match="would have none of its own"):
        dist.detect(env, cuda_count=len(visible.split(",")), hostnames=HOSTS)
    on_cpu = dist.detect(env, cuda_count=0, hostnames=HOSTS)  # the local cluster's placeholder GPUs
    assert dist.check_layout(on_cpu, env) == [f"warning: {says} (this rank runs on CPU, so it goes on)"]
    assert says in capsys.readouterr().err


def test_gpus_left_idle_and_torchrun_with_more_ranks_than_gpus():
    (idle,) = layout(step(CUDA_VISIBLE_DEVICES="0,1,2,3", SLURM_GPUS_ON_NODE="4"))
    assert idle == world.Finding("gpu017 runs 2 task(s) but has 4 GPUs (CUDA_VISIBLE_DEVICES=0,1,2,3): 2 sit idle; ask "
                                 "for one task per GPU, #SBATCH --ntasks-per-node=4 (or --gpus-per-node=2)")
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    (found,) = layout(torchrun, cuda_count=1)
    assert found.fatal and found.text.startswith("login1 runs 2 tasks but has 1 GPU(s) (1 visible): local rank 1")
    assert found.text.endswith("torchrun --nproc-per-node 1 (or a node with 2 GPUs)")


def test_a_healthy_layout_and_one_process_on_many_gpus_say_nothing():
    assert layout(step(CUDA_VISIBLE_DEVICES="0,1", SLURM_GPUS_ON_NODE="2")) == []
    assert layout({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}) == []  # nn.DataParallel drives them all
    assert layout(step()) == []  # CPU
    assert layout(step(nodes="n[1-2]", num_nodes=2, ntasks=4, per_node="2(x2)", nodeid=1, procid=3),
                  resolve=lambda host: ["127.0.0.1"]) == []  # the local cluster: both nodes are this machine


def test_a_job_of_more_nodes_than_tasks_is_said():
    """sbatch --nodes=2 whose script runs python without srun: one process, the other node idle."""
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "n[1-2]", "SLURMD_NODENAME": "n1"}
    assert layout(env) == [world.Finding(
        "the job holds 2 nodes but its 1 task(s) run on 1: 1 node sits idle; start tasks on every node with srun "
        "(#SBATCH --ntasks-per-node=<GPUs per node>, or 1 without GPUs), or ask for #SBATCH --nodes=1")]
    assert layout({**env, "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "2",
                   "SLURM_PROCID": "0", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}, resolve=lambda h: ["127.0.0.1"]) == []


def unresolvable(host):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def test_a_rendezvous_host_that_does_not_resolve_from_a_rank_is_refused():
    env = step(procid=2, localid=0, nodeid=1, ntasks=4, per_node="2(x2)", nodes="gpu[017-018]", num_nodes=2)
    (found,) = layout(env, resolve=unresolvable)
    assert found.fatal and not found.gpu
    assert found.text == ("gpu018: the rendezvous host gpu017 (the first node of gpu[017-018]) does not resolve here, "
                          "so no rank here can reach it; export WORKSHOP_MASTER_ADDR=<an address of gpu017 that every "
                          "node resolves> in the job script, or leave the node out (#SBATCH --exclude=gpu017) (the "
                          "resolver said: Name or service not known)")


@pytest.mark.parametrize("extra, host_resolves, backend, says", [
    ({}, ["127.0.1.1"], "gloo", "gloo would listen on the loopback (this host's name login1 resolves to 127.0.1.1)"),
    ({"GLOO_SOCKET_IFNAME": "lo"}, ["10.0.0.18"], "gloo", "gloo would listen on the loopback (GLOO_SOCKET_IFNAME=lo)"),
    ({"NCCL_SOCKET_IFNAME": "lo"}, ["10.0.0.18"], "nccl", "NCCL_SOCKET_IFNAME=lo names the loopback"),
], ids=["hostname on 127.0.1.1", "GLOO_SOCKET_IFNAME=lo", "NCCL_SOCKET_IFNAME=lo"])
def test_the_loopback_across_nodes_is_refused(extra, host_resolves, backend, says):
    """Ranks on two machines that meet at the store, then hang in the first collective (nanotron#115)."""
    env = step(procid=2, localid=0, nodeid=1, ntasks=4, per_node="2(x2)", nodes="gpu[017-018]", num_nodes=2, **extra)
    names = {"gpu017": ["10.0.0.17"], "gpu018": ["10.0.0.18"], "login1": host_resolves}
    found = layout(env, resolve=names.__getitem__, backend=backend)
    assert [f.fatal for f in found] == [True] and says in found[0].text, found
    assert "in the job script" in found[0].text
    assert layout({**env, "GLOO_SOCKET_IFNAME": "ib0"}, resolve=names.__getitem__, backend="gloo") == []
    # the local cluster: both nodes are this machine, whatever the rendezvous address (a wrong one is the doctor's)
    here = {"gpu017": ["127.0.0.1"], "gpu018": ["127.0.0.1"], "login1": ["127.0.0.1"], "10.255.255.1": ["10.255.255.1"]}
    assert layout({**env, "WORKSHOP_MASTER_ADDR": "10.255.255.1", **extra}, resolve=here.__getitem__,
                  backend=backend) == []


def test_torchrun_variables_half_set_or_out_of_range():
    (alone,) = layout({"RANK": "1"})
    assert not alone.fatal and alone.text.startswith("RANK=1 is set but WORLD_SIZE is not: this process runs alone")
    (past,) = layout({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})
    assert past.fatal and past.text.startswith("RANK=4 but WORLD_SIZE=4: ranks count from 0 to 3")
    (local,) = layout({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"})
    assert local.fatal and local.text.startswith("LOCAL_RANK=2 but LOCAL_WORLD_SIZE=2")


def test_more_threads_than_cpus_names_cpus_per_task():
    (found,) = layout(step(OMP_NUM_THREADS="16"), cpus=4)
    assert found.text == ("gpu017: OMP_NUM_THREADS=16 is more threads than this task has CPUs: they would take turns, "
                          "slower, not faster; export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK in the job script, or ask "
                          "for #SBATCH --cpus-per-task=16 (this task may use 4)")


def test_dist_says_a_layout_once_before_joining_and_refuses_what_cannot_work(capsys):
    said = dist.check_layout(dist.detect({"RANK": "1"}), {"RANK": "1"})
    assert said == [f"warning: {layout({'RANK': '1'})[0].text}"] and said[0] in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="ranks count from 0 to 3"):
        dist.check_layout(dist.DistEnv(), {"RANK": "4", "WORLD_SIZE": "4"})


def test_tasks_per_node_and_a_port_that_is_not_one():
    assert world.tasks_per_node("2(x2),1") == [2, 2, 1] and world.tasks_per_node("4") == [4]
    assert world.slurm_hostnames("n1,n2") == ["n1", "n2"]  # no scontrol for a plain list
    with pytest.raises(ValueError, match="WORKSHOP_MASTER_PORT=abc: give the rendezvous port"):
        world.master_port_override({"WORKSHOP_MASTER_PORT": "abc"})
