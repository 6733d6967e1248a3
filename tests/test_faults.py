"""workshop.launch.faults: `diagnose` on made-up Flight Recorder traces, then faults provoked for real: a rank that skips
an all-reduce on two SLURM nodes (the traces name the rank behind), and a broadcast where the others all-reduce on 2
torchrun ranks, found from the traces after the timeout. Every launch ends within its bound and leaves no process
behind (helpers.launch). Notebook 12 provokes the rest, and its checked cell asserts them, as one process (nbval)
and on 2 ranks (test_notebook_12): the hang on local ranks with the rank and collective named, the mismatch at
once under TORCH_DISTRIBUTED_DEBUG=DETAIL, and the slowed rank found from each rank's work and wait."""

import re
import sys

import pytest

from helpers import STARTUP_S, launch
from workshop.base.tables import WIDTH
from workshop.base.world import local_ranks, without_launcher
from workshop.launch import faults as workshop_faults
from workshop.launch.doctor import HANGING, short_error, wrap
from workshop.launch.faults import diagnose, main, read_traces

TIMEOUT_S = 3  # the process group's timeout in these launches


def entry(seq, op="all_reduce", sizes=((4,),), where=("train.py", 12, "step")):
    return {"collective_seq_id": seq, "profiling_name": f"gloo:{op}", "input_sizes": [list(s) for s in sizes],
            "process_group": ("0", "default_pg"), "is_p2p": False,
            "frames": [{"filename": "/env/lib/torch/distributed/c10d.py", "line": 1, "name": op},
                       {"filename": f"/home/me/{where[0]}", "line": where[1], "name": where[2]}]}


def trace(*entries):
    return {"version": "2.10", "entries": list(entries)}


# --- diagnose ----------------------------------------------------------------------------------------------

def test_a_rank_that_never_entered_a_collective_is_named_with_the_collective():
    traces = {0: trace(entry(1), entry(2), entry(3, where=("train.py", 40, "sync"))), 1: trace(entry(1), entry(2)),
              2: trace(entry(1), entry(2), entry(3))}
    assert diagnose(traces) == [
        "default_pg: rank 1 is behind: it entered 2 collective(s), rank 0 3; rank 1 never called collective #3 "
        "(all_reduce of [[4]], which rank 0 called at train.py:40 (sync))"]


def test_the_first_collective_called_differently_is_named_with_where_each_rank_called_it():
    traces = {0: trace(entry(1), entry(2, sizes=((8, 2),))), 1: trace(entry(1), entry(2, "broadcast", where=("x.py", 7, "f")))}
    assert diagnose(traces) == ["default_pg: the ranks' collective #2 differs: rank 0 all_reduce of [[8, 2]] at "
                                "train.py:12 (step); rank 1 broadcast of [[4]] at x.py:7 (f)"]


def test_traces_that_agree_say_so():
    assert diagnose({0: trace(entry(1), entry(2)), 1: trace(entry(1), entry(2))}) == [
        "every rank entered the same collectives (2 in a group)"]


def test_errors_are_shortened_to_what_a_user_needs():
    text = ("Rank 1 is running collective: CollectiveFingerPrint(SequenceNumber=2, OpType=BROADCAST, TensorShape=[4], "
            "TensorDtypes=Float, TensorDeviceTypes=TensorOptions(dtype=float (default), device=cpu, "
            "memory_format=(nullopt)))")
    assert short_error(text) == ("Rank 1 is running collective: CollectiveFingerPrint(SequenceNumber=2, "
                                 "OpType=BROADCAST, TensorShape=[4], TensorDtypes=Float)")
    # gloo's messages start with a source path on the machine that built the wheel
    assert short_error("[enforce fail at /__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/device.cc:84] "
                       "ifa != nullptr. Unable to find address for: nosuch0") == (
        "ifa != nullptr. Unable to find address for: nosuch0")
    assert short_error("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
                       "waiting 3000ms") == "Timed out waiting 3000ms"


def test_a_wrapped_message_fits_the_width_and_is_read_back_whole():
    message = ("rank 0 on n1: collective 3 failed after 3.0 s: Detected mismatch between collectives on ranks. "
               + "Rank 0 is running collective: CollectiveFingerPrint(SequenceNumber=2, OpType=ALLREDUCE) " * 3).strip()
    lines = wrap(message).splitlines()
    assert len(lines) > 1 and all(len(line) <= WIDTH for line in lines)
    assert all(line.startswith(HANGING) for line in lines[1:])
    output = f"rank 1: skips all-reduce 3 (the planted fault)\n{wrap(message)}\nCheck, in this order:\n  1. a step"
    done = workshop_faults.Launched(workshop_faults.Job(()), (1,), (output,), 1.0, ())
    assert done.said("rank 0 on ") == [message]
    assert done.said() == ["rank 1: skips all-reduce 3 (the planted fault)", message, "Check, in this order:", "  1. a step"]


def test_bad_input_exits_2(tmp_path, capsys):
    assert main(["read", str(tmp_path)]) == 2
    assert "no rank<R>.pkl in" in capsys.readouterr().err
    assert main(["hang", "--traces", str(tmp_path), "--step", "5", "--steps", "4"]) == 2
    assert "--step 5 is after the last of --steps 4" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:
        main(["hang", "--traces", str(tmp_path), "--timeout", "nan"])
    assert exit.value.code == 2
    with pytest.raises(FileNotFoundError, match="TORCH_FR_BUFFER_SIZE"):
        read_traces(tmp_path)


def test_a_launch_past_its_bound_is_ended_with_everything_it_started(clean_env):
    """A small world whose ranks never end (a web server each) is ended at its bound, none of it left running."""
    job = workshop_faults.Job(("--bind", "127.0.0.1", "0"), ranks=2, bound_s=2, module="http.server")
    (done,) = workshop_faults.launch(job)
    assert done.ended_at_bound and done.returncodes == (None, None)
    assert done.seconds == 2 and done.left == ()


# --- provoked on 2 ranks --------------------------------------------------------------------------------------

def faults(*args):
    """python -m workshop.launch.faults `args` on 2 local ranks: (its command line, its environment)."""
    return local_ranks(2, "workshop.launch.faults", *map(str, args), run="module")


@pytest.mark.slurm
def test_on_slurm_the_traces_of_two_nodes_name_the_rank_behind(slurm, tmp_path):
    """One task on each node of the local cluster; the traces folder is on the file system both nodes share."""
    done = launch(["srun", "--nodes=2", "--ntasks-per-node=1", "--time=00:02:00", sys.executable, "-m", "workshop.launch.faults",
                   "hang", "--traces", str(tmp_path), "--timeout", str(TIMEOUT_S)], without_launcher(),
                  STARTUP_S + TIMEOUT_S + 15)
    assert done.rc != 0 and done.left == []
    assert re.search(rf"rank 0 on n1: collective 3 failed after {TIMEOUT_S}\.\d s: .*Timed out", done.out), done.out[-3000:]
    (finding,) = diagnose(read_traces(tmp_path))
    assert finding.startswith("default_pg: rank 1 is behind: it entered 2 collective(s), rank 0 3; rank 1 never called "
                              "collective #3 (all_reduce of [[4]]")


def test_a_mismatched_collective_is_found_in_the_traces_after_the_timeout(clean_env, tmp_path):
    done = launch(*faults("mismatch", "--traces", tmp_path, "--timeout", TIMEOUT_S), STARTUP_S + TIMEOUT_S + 5)
    assert done.rc != 0 and done.left == []
    for rank in (0, 1):
        assert re.search(rf"rank {rank} on \S+: collective 3 failed after {TIMEOUT_S}\.\d s", done.out), done.out[-3000:]
    (finding,) = diagnose(read_traces(tmp_path))
    assert re.fullmatch(r"default_pg: the ranks' collective #3 differs: rank 0 all_reduce of \[\[4\]\] at faults\.py:\d+ "
                        r"\(_all_reduces\); rank 1 broadcast of \[\[4\]\] at faults\.py:\d+ \(_all_reduces\)", finding)
