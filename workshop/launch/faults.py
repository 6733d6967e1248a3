"""Faults provoked on purpose, and how to find them: a rank that skips a collective (the others hang until the
process group's timeout), a rank that calls another collective than the others, a rank slower than the rest.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m workshop.launch.faults hang --traces DIR
    python -m torch.distributed.run --standalone --nproc-per-node 2 -m workshop.launch.faults mismatch --traces DIR
    TORCH_DISTRIBUTED_DEBUG=DETAIL python -m torch.distributed.run ... -m workshop.launch.faults mismatch --traces DIR
    python -m torch.distributed.run --standalone --nproc-per-node 2 -m workshop.launch.faults straggle --delay 0.05
    srun --nodes 2 --ntasks-per-node 2 python -m workshop.launch.faults hang --traces DIR      # in an sbatch script
    python -m workshop.launch.faults read DIR                                                  # who is behind, and where

Every rank keeps PyTorch's Flight Recorder (TORCH_FR_BUFFER_SIZE: the last collectives each rank entered, with
the Python stack that called them; on NCCL and, since torch 2.7, on gloo) and writes it to DIR/rank<R>.pkl when a
collective fails, or when it is done. `read_traces` and `diagnose` compare the ranks' records: the first
collective the ranks called differently, and the ranks that never entered a collective the others wait in. On
NCCL the recorder also knows which collectives completed (TORCH_NCCL_DUMP_ON_TIMEOUT writes it by itself, into
TORCH_FR_DUMP_TEMP_FILE); on gloo every entry stays "scheduled", so the sequence numbers are what tell.

With TORCH_DISTRIBUTED_DEBUG=DETAIL, torch.distributed checks before every collective that all ranks call the
same one (op, shapes, dtypes), and a mismatch fails at once on every rank, naming both collectives, instead of
hanging until the timeout. It costs an extra all-gather per collective: a setting for finding a bug, not for
training.

`straggle` measures a rank that is slower than the others: each step's own work and the time each rank then
waits inside the all-reduce for the slowest one.

Exit status of a rank: 1 where a collective failed (what the fault does to the others), 0 where none did,
2 bad input.

From a notebook, `launch` provokes them in a small world of its own: local child processes, started by rank 0
whatever the notebook's own world, each launch bounded in time and checked to leave no process behind.
"""

from __future__ import annotations

import argparse
import os
import pickle
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
import torch.distributed as tdist

from workshop import dist
from workshop.base import runs, world
from workshop.base.params import positive
from workshop.base.tables import table
from workshop.dist import DistEnv
from workshop.launch.doctor import HANGING, host_name, short_error, wrap

TRACE_BUFFER = "2000"  # collectives each rank's Flight Recorder keeps (TORCH_FR_BUFFER_SIZE)
EXIT_OK, EXIT_USAGE = 0, 2


# --- the Flight Recorder's records --------------------------------------------------------------------------

def keep_traces() -> None:
    """Turn the Flight Recorder on for the process group made after this call (it reads the variable then)."""
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", TRACE_BUFFER)


def dump_trace(folder: Path, rank: int) -> Path:
    """This rank's Flight Recorder records, as written by torch (a pickled dict), in folder/rank<R>.pkl."""
    # torch._C._distributed_c10d._dump_fr_trace is what torch.distributed's own dump-on-timeout calls for
    # the gloo backend; there is no public name for it in torch 2.14.
    data = torch._C._distributed_c10d._dump_fr_trace()
    path = Path(folder) / f"rank{rank}.pkl"
    return runs.atomic_write(path, lambda f: f.write(data), binary=True)


def read_traces(folder: Path) -> dict[int, dict]:
    """{rank: that rank's Flight Recorder dump} of every rank<R>.pkl in `folder`. The dumps are pickles, as torch
    writes them: read only those of your own jobs."""
    folder = Path(folder)
    traces = {}
    for path in sorted(folder.glob("rank*.pkl")):
        with open(path, "rb") as f:
            traces[int(path.stem[4:])] = pickle.load(f)
    if not traces:
        raise FileNotFoundError(f"no rank<R>.pkl in {folder}: run the job with TORCH_FR_BUFFER_SIZE set and "
                                "dump each rank's trace (workshop.launch.faults.dump_trace) when a collective fails")
    return traces


def _where(entry: dict) -> str:
    """The innermost caller outside torch: file:line (function)."""
    for frame in entry.get("frames") or []:
        filename = frame.get("filename", "")
        if f"{os.sep}torch{os.sep}" not in filename:
            return f"{Path(filename).name}:{frame.get('line')} ({frame.get('name')})"
    return "an unknown place"


def _what(entry: dict) -> str:
    name = entry["profiling_name"].split(":", 1)[-1]
    return f"{name} of {entry['input_sizes']}"


def collectives(trace: dict) -> dict[str, dict[int, dict]]:
    """{process group: {sequence number: entry}} of one rank's collectives (point-to-point left out)."""
    groups: dict[str, dict[int, dict]] = defaultdict(dict)
    for entry in trace.get("entries", []):
        if not entry.get("is_p2p"):
            groups[entry["process_group"][1]][entry["collective_seq_id"]] = entry
    return groups


def diagnose(traces: dict[int, dict]) -> list[str]:
    """What the ranks' records say, in plain words: per process group, the first collective that the ranks
    called differently, and each rank that never entered a collective another rank waits in."""
    per_rank = {rank: collectives(trace) for rank, trace in traces.items()}
    groups = sorted({group for by_group in per_rank.values() for group in by_group})
    findings = []
    for group in groups:
        seen = {rank: by_group.get(group, {}) for rank, by_group in per_rank.items()}
        last = {rank: max(entries, default=0) for rank, entries in seen.items()}
        for seq in range(1, min(last.values()) + 1):
            called = {rank: entries[seq] for rank, entries in seen.items() if seq in entries}
            kinds = {(e["profiling_name"], str(e["input_sizes"])) for e in called.values()}
            if len(kinds) > 1:
                calls = "; ".join(f"rank {rank} {_what(e)} at {_where(e)}" for rank, e in sorted(called.items()))
                findings.append(f"{group}: the ranks' collective #{seq} differs: {calls}")
                break
        ahead = max(last.values())
        leader = min(rank for rank, n in last.items() if n == ahead)
        for rank in sorted(r for r, n in last.items() if n < ahead):
            missing = seen[leader].get(last[rank] + 1)  # None once the leader's ring buffer has dropped it
            what = (f"{_what(missing)}, which rank {leader} called at {_where(missing)}" if missing else
                    f"older than rank {leader}'s buffer holds: raise TORCH_FR_BUFFER_SIZE")
            findings.append(f"{group}: rank {rank} is behind: it entered {last[rank]} collective(s), rank {leader} "
                            f"{ahead}; rank {rank} never called collective #{last[rank] + 1} ({what})")
    if not findings:
        counts = sorted({max(entries) for by_group in per_rank.values() for entries in by_group.values() if entries})
        findings.append(f"every rank entered the same collectives ({' or '.join(map(str, counts)) or 'none'} in a group)")
    return findings


def format_findings(findings: list[str], indent: str = "") -> str:
    """`diagnose`'s findings, one paragraph each, wrapped to tables.WIDTH columns with a hanging indent."""
    return "\n".join(wrap(finding, indent, indent + HANGING) for finding in findings)


# --- the faults -------------------------------------------------------------------------------------------

def _all_reduces(env: DistEnv, steps: int, fault_rank: int, fault_step: int, fault: str, traces: Path,
                 timeout_s: float = world.DEFAULT_TIMEOUT_S) -> int:
    """`steps` all-reduces of a known tensor; rank `fault_rank` does `fault` at step `fault_step` (1-based):
    "skip" leaves it out and is then busy elsewhere until the others have given up after the process group's
    `timeout_s` (its trace is the same whenever it is taken, so it dumps it first: a launcher ends it once the
    others have failed), "broadcast" calls a broadcast instead. Every rank dumps its trace when a collective fails
    or when it is done. Returns 1 where a collective failed, else 0."""
    for step in range(1, steps + 1):
        t = torch.ones(4)
        if env.rank == fault_rank and step == fault_step and fault == "skip":
            print(f"rank {env.rank}: skips all-reduce {step} (the planted fault)", flush=True)
            dump_trace(traces, env.rank)
            time.sleep(timeout_s + 3)  # busy elsewhere, past the others' timeout
            return 0
        started = time.monotonic()
        try:
            if env.rank == fault_rank and step == fault_step and fault == "broadcast":
                print(f"rank {env.rank}: calls a broadcast where the others all-reduce (the planted fault)", flush=True)
                tdist.broadcast(t, src=0)
            else:
                tdist.all_reduce(t)
        except RuntimeError as e:
            print(wrap(f"rank {env.rank} on {host_name()}: collective {step} failed after {time.monotonic() - started:.1f} "
                       f"s: {short_error(str(e))[:600]}"), flush=True)
            dump_trace(traces, env.rank)
            return 1
    dump_trace(traces, env.rank)
    return 0


def straggle(env: DistEnv, steps: int, slow_rank: int, delay_s: float, work: int = 256) -> list[dict]:
    """Each step every rank multiplies two (work x work) matrices (its own work), rank `slow_rank` sleeps
    `delay_s` more, then all all-reduce: per rank and step, the seconds of work and the seconds waited inside
    the all-reduce. Gathered on every rank: [{rank, work_s: [...], wait_s: [...]}, ...]."""
    a = torch.randn(work, work)
    mine = {"rank": env.rank, "work_s": [], "wait_s": []}
    for _ in range(steps):
        dist.barrier()  # every step starts together, so a wait is this step's
        start = time.perf_counter()
        b = a @ a
        if env.rank == slow_rank:
            time.sleep(delay_s)
        worked = time.perf_counter()
        if env.is_distributed:
            tdist.all_reduce(b[:1, :1].contiguous())
        done = time.perf_counter()
        mine["work_s"].append(worked - start)
        mine["wait_s"].append(done - worked)
    if not env.is_distributed:
        return [mine]
    everyone = [None] * env.world_size
    tdist.all_gather_object(everyone, mine)
    return everyone


def format_straggle(times: list[dict]) -> str:
    """One line per rank: the median seconds of its own work and of its wait inside the all-reduce, in ms."""
    return table(["rank", "work ms", "wait in all-reduce ms"],
                 [[t["rank"], f"{1e3 * statistics.median(t['work_s']):.1f}", f"{1e3 * statistics.median(t['wait_s']):.1f}"]
                  for t in times])


def slowest(times: list[dict]) -> tuple[int, float, float]:
    """The straggler in `straggle`'s times: (its rank, how many ms longer its own work takes than the median of the
    others', the median ms the other ranks wait for it inside the all-reduce). On one rank: (0, 0, 0)."""
    work = {t["rank"]: statistics.median(t["work_s"]) for t in times}
    wait = {t["rank"]: statistics.median(t["wait_s"]) for t in times}
    rank = max(work, key=work.get)
    others = [r for r in work if r != rank]
    if not others:
        return rank, 0.0, 0.0
    return (rank, 1e3 * (work[rank] - statistics.median(work[r] for r in others)),
            1e3 * statistics.median(wait[r] for r in others))


def check_straggler(find, measured: list[dict]):
    """Exercise 12.1: a student's `find(times)` must name the straggler of `straggle`'s times (`slowest`'s rank): on
    made-up times where the usual mistakes pick another rank, then on the times measured here. The hint names the
    mistake."""
    from workshop.check import Match

    def ranks(work_ms: list[list[float]], wait_ms: list[list[float]]) -> list[dict]:
        return [{"rank": r, "work_s": [w / 1e3 for w in work], "wait_s": [w / 1e3 for w in wait]}
                for r, (work, wait) in enumerate(zip(work_ms, wait_ms))]

    # rank 2 works 50 ms longer every step; rank 0 waits longest for it; rank 1 had one slow step (a hiccup)
    made_up = ranks([[10, 10, 10, 10], [10, 10, 400, 10], [60, 60, 60, 60], [10, 11, 10, 10]],
                    [[55, 55, 55, 55], [50, 50, 0, 50], [0, 0, 0, 0], [50, 49, 50, 50]])
    for name, times in (("made-up times", made_up), ("the times measured above", measured)):
        want, got = slowest(times)[0], find(times)
        if got == want:
            continue
        wait = {t["rank"]: statistics.median(t["wait_s"]) for t in times}
        mean = {t["rank"]: statistics.mean(t["work_s"]) for t in times}
        if len(times) > 1 and got == max(wait, key=wait.get):
            return Match(False, f"on {name} you named rank {got}, which waits longest: the straggler is the rank the "
                                f"others wait for, the one whose own work takes longest (rank {want})")
        if got == max(mean, key=mean.get):
            return Match(False, f"on {name} you named rank {got}, whose mean work is longest because of one slow step: "
                                f"compare each rank's median work (rank {want})")
        return Match(False, f"on {name} you named rank {got!r}, the straggler is rank {want}: the rank whose median "
                            "own work per step is longest")
    return Match(True)


def plot_straggle(times: list[dict]):
    """Each rank's median step as a bar: its own work, then its wait inside the all-reduce."""
    import matplotlib.pyplot as plt

    ranks = [t["rank"] for t in times]
    work = [1e3 * statistics.median(t["work_s"]) for t in times]
    wait = [1e3 * statistics.median(t["wait_s"]) for t in times]
    fig, ax = plt.subplots(figsize=(6, 0.8 + 0.45 * len(ranks)), layout="constrained")
    ax.barh(ranks, work, label="own work")
    ax.barh(ranks, wait, left=work, label="waiting inside the all-reduce")
    ax.set_yticks(ranks, [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("ms per step (median)")
    # above the axes, where no bar is: inside, the legend would cover the longest bar (the straggler's work)
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.02), ncols=2, borderaxespad=0, frameon=False, fontsize="small")
    return fig


# --- a small world of its own, from a notebook -----------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """`python -m <module> <args>` as `ranks` local ranks (RANK, WORLD_SIZE, LOCAL_RANK and a free MASTER_PORT on
    127.0.0.1 set, as torchrun would), ended after `bound_s` seconds if still running; `env` is added to every
    rank's environment (a value of None removes the variable). The ranks run on CPU with gloo (no GPU visible), so
    they never take memory or time from a GPU of the notebook's own ranks."""

    args: tuple[str, ...]
    ranks: int = 2
    bound_s: float = 30.0
    env: dict = field(default_factory=dict)
    module: str = "workshop.launch.faults"


@dataclass(frozen=True)
class Launched:
    """What a Job did: each rank's exit status (None: still running at the bound, so ended) and output
    (stdout and stderr together), the seconds until the last rank ended, and the processes left behind (none)."""

    job: Job
    returncodes: tuple[int | None, ...]
    outputs: tuple[str, ...]
    seconds: float
    left: tuple[str, ...]

    @property
    def ended_at_bound(self) -> bool:
        return None in self.returncodes

    def lines(self, pattern: str = "") -> list[str]:
        """Every rank's output lines that contain `pattern`, in rank order."""
        return [line for out in self.outputs for line in out.splitlines() if pattern in line]

    def said(self, pattern: str = "") -> list[str]:
        """Every rank's messages that contain `pattern`, in rank order, each on one line: a line with the lines
        after it that continue it (indented by doctor.HANGING, as doctor.wrap writes them) joined back."""
        messages = []
        for out in self.outputs:
            rank_messages: list[str] = []
            for line in out.splitlines():
                if line.startswith(HANGING) and rank_messages:
                    rank_messages[-1] += " " + line.strip()
                else:
                    rank_messages.append(line)
            messages += [m for m in rank_messages if pattern in m]
        return messages


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(job: Job, marker: str, logs: Path) -> list[tuple[subprocess.Popen, Path]]:
    # One process per rank, not torchrun: each in a session and a log of its own, so the bound kills a rank and all it started.
    base = world.without_launcher()  # nothing of the notebook's own world leaks into this one
    base.pop("WORKSHOP_RUN_DIR", None)  # nor its run folder
    base.update(WORLD_SIZE=str(job.ranks), LOCAL_WORLD_SIZE=str(job.ranks), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(free_port()), WORKSHOP_LAUNCH=marker, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    started = []
    for rank in range(job.ranks):
        env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
        for key, value in job.env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        log = logs / f"{marker}-{rank}.log"
        with open(log, "w") as out:  # a file, not a pipe: a rank that writes a lot never blocks on it
            started.append((subprocess.Popen([sys.executable, "-m", job.module, *map(str, job.args)], env=env,
                                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True), log))
    return started


def _left_behind(marker: str) -> list[str]:
    """Processes of this user that carry the launch's marker in their environment."""
    left = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.environ().get("WORKSHOP_LAUNCH") == marker and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{proc.pid}: {' '.join(proc.info['cmdline'] or [])[:200]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return left


def _run(jobs: tuple[Job, ...]) -> list[Launched]:
    with tempfile.TemporaryDirectory(prefix="workshop-launch-") as tmp:
        begun = time.monotonic()
        markers = [uuid.uuid4().hex for _ in jobs]
        started = [_start(job, marker, Path(tmp)) for job, marker in zip(jobs, markers)]
        results = []
        for job, marker, procs in zip(jobs, markers, started):
            ended = 0.0
            for proc, _ in procs:
                try:
                    proc.wait(timeout=max(0.0, begun + job.bound_s - time.monotonic()))
                    ended = max(ended, time.monotonic() - begun)
                except subprocess.TimeoutExpired:
                    ended = job.bound_s
            codes = tuple(proc.poll() for proc, _ in procs)
            for proc, _ in procs:  # a rank still running at the bound, and anything it started, ends here
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):  # the group is gone (and its id perhaps reused)
                    pass
                proc.wait()
            time.sleep(0.1)  # let the kernel reap what was killed before it is looked for
            results.append(Launched(job, codes, tuple(log.read_text(errors="replace") for _, log in procs),
                                    round(ended, 1), tuple(_left_behind(marker))))
        return results


def launch(*jobs: Job, env: DistEnv | None = None) -> list[Launched]:
    """Run the jobs at the same time, each bounded by its `bound_s`; on rank 0 of the current world when it has
    more than one rank (the others wait, then receive the results), so a notebook starts one set whatever its
    own world is."""
    env = env or dist.get_env()
    results = _run(jobs) if env.is_main else None
    if env.is_distributed:
        box = [results]
        tdist.broadcast_object_list(box, src=0)
        results = box[0]
    return results


# --- the command line -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m workshop.launch.faults", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, what in (("hang", "a rank skips an all-reduce: the others wait until the timeout"),
                       ("mismatch", "a rank calls a broadcast where the others all-reduce")):
        q = sub.add_parser(name, help=what)
        q.add_argument("--traces", type=Path, required=True, help="folder for each rank's Flight Recorder dump")
        q.add_argument("--rank", type=int, default=1, help="the rank with the fault (default 1)")
        q.add_argument("--step", type=positive(int), default=3, help="the all-reduce it gets wrong (default 3)")
        q.add_argument("--steps", type=positive(int), default=4, help="all-reduces in all (default 4)")
        q.add_argument("--timeout", type=positive(float), default=5.0,
                       help="the process group's timeout in seconds (default 5)")
    q = sub.add_parser("straggle", help="a rank slower than the others: each rank's work and wait per step")
    q.add_argument("--rank", type=int, default=1, help="the slow rank (default 1)")
    q.add_argument("--delay", type=positive(float), default=0.05, help="its extra seconds per step (default 0.05)")
    q.add_argument("--steps", type=positive(int), default=10, help="steps (default 10)")
    q = sub.add_parser("read", help="what the ranks' dumps in a folder say")
    q.add_argument("folder", type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "read":
        try:
            print(format_findings(diagnose(read_traces(args.folder))))
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
        return EXIT_OK
    if args.command == "straggle":
        env = dist.init()
        if not 0 <= args.rank < env.world_size:
            print(f"error: --rank {args.rank} is not a rank of this world of {env.world_size}", file=sys.stderr)
            return EXIT_USAGE
        times = straggle(env, args.steps, args.rank, args.delay)
        dist.print0(format_straggle(times))
        dist.cleanup()
        return EXIT_OK
    if args.step > args.steps:
        print(f"error: --step {args.step} is after the last of --steps {args.steps}", file=sys.stderr)
        return EXIT_USAGE
    keep_traces()
    env = dist.init(timeout_s=args.timeout)
    if not 0 <= args.rank < env.world_size:
        print(f"error: --rank {args.rank} is not a rank of this world of {env.world_size}", file=sys.stderr)
        return EXIT_USAGE
    args.traces.mkdir(parents=True, exist_ok=True)
    fault = "skip" if args.command == "hang" else "broadcast"
    failed = _all_reduces(env, args.steps, args.rank, args.step, fault, args.traces, args.timeout)
    # a group whose collective timed out cannot be destroyed cleanly on gloo: leave without it
    sys.stdout.flush()
    os._exit(failed)


if __name__ == "__main__":
    sys.exit(main())
