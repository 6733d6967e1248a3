"""python -m workshop.launch.doctor: `diagnose` on made-up worlds, then the command itself on 2 torchrun ranks with a
planted misconfiguration and with a rendezvous host that does not resolve (refused at once), and as SLURM steps: 2
nodes x 2 tasks (healthy), 3 tasks over 2 nodes, a rendezvous address nobody answers on, a port already taken. A
launch that does not end within its bound fails the test; after every launch no process that carried its marker
may remain. Notebook 12's checked cell covers the rest on local ranks (nbval, test_notebook_12): its report of
every rank and exact all-reduce, and four ways ranks fail to meet, each within its bound."""

import os
import re
import socket
import sys

import pytest

from helpers import STARTUP_S, launch
from workshop import dist
from workshop.base.world import local_ranks, without_launcher
from workshop.launch.doctor import Report, diagnose, main

DOCTOR = [sys.executable, "-m", "workshop.launch.doctor"]


# --- diagnose ---------------------------------------------------------------------------------------

def test_two_ranks_on_one_gpu_are_named():
    gpus = ("GPU-aaaa", "GPU-bbbb")
    world = [Report(rank=0, host="n1", local_rank=0, device="cuda:0", gpu_uuids=gpus),
             Report(rank=1, host="n1", local_rank=1, device="cuda:0", gpu_uuids=gpus)]  # both picked cuda:0
    problems = diagnose(world)
    assert len(problems) == 1
    assert problems[0].startswith("ranks 0 and 1 on n1 both use the GPU GPU-aaaa (cuda:0, cuda:0)")
    assert "--gpus-per-node = --ntasks-per-node" in problems[0]
    # the same device index on different nodes, or GPUs bound per task (each rank sees its own as cuda:0): fine
    assert diagnose([Report(rank=0, host="n1", device="cuda:0", gpu_uuids=("GPU-a",)),
                     Report(rank=1, host="n2", device="cuda:0", gpu_uuids=("GPU-a",))]) == []
    assert diagnose([Report(rank=0, host="n1", local_rank=0, device="cuda:0", gpu_uuids=("GPU-a",)),
                     Report(rank=1, host="n1", local_rank=1, device="cuda:0", gpu_uuids=("GPU-b",))]) == []


def test_the_same_local_rank_on_one_host_without_gpus_is_named():
    world = [Report(rank=r, host=h, local_rank=0) for r, h in ((0, "n1"), (1, "n1"), (2, "n2"))]
    assert diagnose(world) == [
        "ranks 0 and 1 on n1 both have local rank 0: they would share cuda:0 on a GPU node. Each rank on a node needs "
        "its own local rank (LOCAL_RANK under torchrun, SLURM_LOCALID under srun): is something (the job script, a "
        ".bashrc) setting LOCAL_RANK for every rank?"]


def test_the_layouts_lines_come_first_each_once_then_torch_versions():
    """What workshop.base.world.layout finds (tests/test_layout.py) is said once, though every rank of a node finds
    it; then what only the gathered reports show."""
    idle = ("n1 runs 2 task(s) but has 4 GPUs (CUDA_VISIBLE_DEVICES=0,1,2,3): 2 sit idle; ask for one task per GPU, "
            "#SBATCH --ntasks-per-node=4 (or --gpus-per-node=2)")
    two = [Report(rank=r, host="n1", local_rank=r, layout=(idle,), torch_version="2.5.1") for r in range(2)]
    mixed = [*two, Report(rank=2, host="n2", torch_version="2.4.0")]
    problems = diagnose(mixed)
    assert problems[0] == idle and len(problems) == 2
    assert problems[1].startswith("the ranks run different torch versions: torch 2.4.0 on rank 2 (n2); "
                                  "torch 2.5.1 on ranks 0 and 1 (n1)")


def test_a_rank_reports_its_layout(clean_env):
    from workshop.launch.doctor import local_report

    report = local_report(dist.detect(), environ={"OMP_NUM_THREADS": "4096", "SLURMD_NODENAME": "n1"})
    assert report.layout == ("n1: OMP_NUM_THREADS=4096 is more threads than this task has CPUs: they would take "
                             "turns, slower, not faster; export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK in the job "
                             f"script, or ask for #SBATCH --cpus-per-task=4096 (this task may use {report.cpus})",)
    assert report.cannot_run is None


def test_a_healthy_world_gives_nothing():
    world = [Report(rank=r, host=f"n{r // 2 + 1}", local_rank=r % 2, device=f"cuda:{r % 2}",
                    gpu_uuids=(f"GPU-{r // 2}a", f"GPU-{r // 2}b"), omp_num_threads="4", cpus=8) for r in range(4)]
    assert diagnose(world) == []
    assert diagnose([Report(rank=r, host="n1", local_rank=r) for r in range(2)]) == []


def test_bad_command_line_input_exits_2(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--timeout", "0"])
    assert exit.value.code == 2 and "0 must be a finite number above 0" in capsys.readouterr().err


# --- the command ------------------------------------------------------------------------------------

def table(out: str) -> dict[int, list[str]]:
    """Rank 0's table: rank -> the line's cells."""
    rows = [line.split() for line in out.splitlines() if re.match(r"^\d+\s+\S+\s+\d+\s+(cpu|cuda)", line)]
    return {int(cells[0]): cells for cells in rows}


def test_a_planted_local_rank_is_named(clean_env):
    """Both ranks told LOCAL_RANK=0: the doctor joins, then names them, and exits 1."""
    done = launch(*local_ranks(2, "bash", "-c", f"LOCAL_RANK=0 exec {sys.executable} -m workshop.launch.doctor", run="program"),
                  STARTUP_S + 30)
    assert [cells[2] for _, cells in sorted(table(done.out).items())] == ["0", "0"], done.out[-4000:]
    host = table(done.out)[0][1]
    assert f"ranks 0 and 1 on {host} both have local rank 0: they would share cuda:0" in done.out
    assert done.rc == 1 and done.left == []


def test_a_rendezvous_host_that_does_not_resolve_fails_at_once(clean_env):
    """With --timeout 60, ending within the launch's start alone shows that no rank waited for it."""
    done = launch(*local_ranks(2, "bash", "-c", f"MASTER_ADDR=no-such-host.invalid exec {sys.executable} -m "
                                                "workshop.launch.doctor --timeout 60", run="program"), STARTUP_S)
    assert done.rc != 0
    assert "the rendezvous host 'no-such-host.invalid' does not resolve" in done.out, done.out[-4000:]
    assert "scontrol show hostnames $SLURM_JOB_NODELIST | head -1" in done.out and done.left == []


@pytest.mark.slurm
def test_srun_two_nodes_two_tasks_each(slurm):
    done = launch(["srun", "--nodes=2", "--ntasks-per-node=2", "--time=00:02:00", *DOCTOR, "--timeout", "20"],
                  without_launcher(), STARTUP_S + 40)
    assert done.rc == 0, done.out[-4000:]
    rows = table(done.out)
    assert [(cells[1], cells[2]) for _, cells in sorted(rows.items())] == [("n1", "0"), ("n1", "1"), ("n2", "0"), ("n2", "1")]
    assert {cells[7].rsplit(":", 1)[0] for cells in rows.values()} == {"n1"}  # the rendezvous host: the first node
    assert "on 4 ranks (gloo): sum exact" in done.out and "nothing wrong found" in done.out
    assert done.left == []


@pytest.mark.slurm
def test_srun_three_tasks_over_two_nodes(slurm):
    """sbatch --ntasks=3 on two nodes of 2 CPUs: 2 tasks on the first, 1 on the second; every rank knows it."""
    done = launch(["srun", "--nodes=2", "--ntasks=3", "--time=00:02:00", *DOCTOR, "--timeout", "20"], without_launcher(),
                  STARTUP_S + 40)
    assert done.rc == 0, done.out[-4000:]
    rows = table(done.out)
    assert [(cells[1], cells[2]) for _, cells in sorted(rows.items())] == [("n1", "0"), ("n1", "1"), ("n2", "0")]
    assert "on 3 ranks (gloo): sum exact" in done.out and "nothing wrong found" in done.out
    assert done.left == []


@pytest.mark.slurm
def test_srun_with_a_wrong_workshop_master_addr(slurm):
    done = launch(["srun", "--nodes=2", "--ntasks-per-node=2", "--time=00:02:00", *DOCTOR, "--timeout", "5"],
                  without_launcher(), STARTUP_S + 20, WORKSHOP_MASTER_ADDR="10.255.255.1")
    assert done.rc != 0
    named = re.findall(r"rank (\d) on (n\d): could not join the process group of 4 ranks at 10\.255\.255\.1:", done.out)
    assert sorted(named) == [("0", "n1"), ("1", "n1"), ("2", "n2"), ("3", "n2")], done.out[-4000:]
    assert done.left == []


@pytest.mark.slurm
def test_srun_with_a_rendezvous_port_already_taken(slurm):
    """Something listens on the job's rendezvous port on the first node: rank 0 says so at once."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = launch(["srun", "--nodes=2", "--ntasks-per-node=1", "--time=00:02:00", *DOCTOR, "--timeout", "5"],
                      without_launcher(), STARTUP_S + 10, WORKSHOP_MASTER_PORT=str(port))
    assert done.rc != 0 and done.left == []
    assert re.search(rf"rank 0 on n1: the port {port} is already taken on n1: another process listens on it", done.out), \
        done.out[-3000:]
    assert f"ss -ltn | grep {port}" in done.out


def test_one_process_reports_dists_world(clean_env):
    """The doctor's rank and device are workshop.dist's, never its own: one process reports dist's single world."""
    from workshop.launch.doctor import local_report

    report = local_report(dist.detect())
    assert (report.rank, report.world_size, report.device, report.master_addr) == (0, 1, "cpu", None)
    assert report.cpus == len(os.sched_getaffinity(0))
