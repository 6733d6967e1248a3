"""A pre-flight check for the start of a job: can these ranks form a process group, and does each one
sit where it should (its own GPU, enough CPUs, the same torch)? What is wrong is said in plain words,
with what to do.

    python -m workshop.launch.doctor                                                        # one process
    python -m torch.distributed.run --standalone --nproc-per-node 2 -m workshop.launch.doctor
    srun --nodes 2 --ntasks-per-node 4 --gpus-per-node 4 python -m workshop.launch.doctor   # in an sbatch script or salloc

Each rank first works out what it can alone (`local_report`): its host, rank and local rank (from
`workshop.dist`), the device dist gives it, the GPUs it sees, the rendezvous address and whether it
resolves, the local interface that routes to it, OMP_NUM_THREADS and the CPUs it may use, and the layout's mistakes
(`workshop.base.world.layout`, one line each naming the #SBATCH option to change; a layout no group survives stops
the rank at once, as a rendezvous host that does not resolve does). Then it joins
the group with a short timeout (--timeout, 30 s): a rank that cannot join says what failed and the
checklist that fixes it, and exits within that time; a missing group never hangs. Joined, the ranks
gather their reports; rank 0 prints one line per rank and what `diagnose` finds, then an all-reduce of
a known tensor, its sum checked exactly, timed as the fastest of a few repetitions (algbw and busbw as
in workshop.measure.bench).

Exit status: 0 nothing wrong; 1 something is (diagnose, or an inexact sum); 2 bad command-line input;
3 this rank could not join the group.

Under SLURM the rendezvous host is the job's first node; WORKSHOP_MASTER_ADDR (and WORKSHOP_MASTER_PORT)
choose another (workshop.dist). Under torchrun it is the launcher's MASTER_ADDR.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

import psutil
import torch
import torch.distributed as tdist

from workshop import dist
from workshop.base import tables, world
from workshop.base.hardware import device_type
from workshop.base.params import positive
from workshop.base.tables import table
from workshop.dist import DistEnv
from workshop.measure import collectives, metrics

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_NO_GROUP = 0, 1, 2, 3
HANGING = "    "  # what starts each line that continues a message (Launched.said in faults joins them back)
_PATTERN = 1024  # element i of every rank's tensor holds (rank + 1) + i % _PATTERN: a misplaced chunk shows


@dataclass(frozen=True)
class Report:
    """What one rank knows about itself before it joins the group."""

    rank: int
    host: str
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"  # what workshop.dist gives this rank
    backend: str = "gloo"
    launcher: str = "single"
    cuda_visible_devices: str | None = None
    gpu_uuids: tuple[str, ...] = ()  # the GPUs this rank sees, in cuda:<i> order
    master_addr: str | None = None  # None: one process, no rendezvous
    master_port: int | None = None
    resolves_to: tuple[str, ...] = ()
    resolve_error: str | None = None  # the address does not resolve: why
    interface: str | None = None  # this host's interface that routes to the rendezvous host, and its address
    local_addr: str | None = None
    route_error: str | None = None
    socket_ifname: str | None = None  # GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME, as set
    omp_num_threads: str | None = None
    cpus: int = 1  # CPUs this process may run on (its affinity)
    torch_version: str = torch.__version__
    layout: tuple[str, ...] = ()  # what workshop.base.world.layout finds wrong with where this rank sits
    cannot_run: str | None = None  # the first of those that no run survives (the rank stops before joining)

    @property
    def gpu(self) -> str | None:
        """The UUID of the GPU this rank would use, where it has one."""
        if device_type(self.device) != "cuda" or not self.gpu_uuids:
            return None
        index = int(self.device.split(":")[1]) if ":" in self.device else 0
        return self.gpu_uuids[index] if index < len(self.gpu_uuids) else None


# --- what a rank sees alone ------------------------------------------------------------------------

def wrap(text: str, first: str = "", rest: str = HANGING) -> str:
    """`tables.wrap` with the doctor's hanging indent, which `faults.Launched.said` recognises."""
    return tables.wrap(text, first, rest)


def short_error(text: str) -> str:
    """A collective's or a rendezvous' error on one line, as a user needs it: without the tensor options that
    DETAIL's fingerprints spell out, and without the C++ source path that gloo puts first ("[enforce fail at
    /__w/pytorch/.../device.cc:84]": a path on the machine that built the wheel, not on this one)."""
    text = re.sub(r", TensorDeviceTypes=TensorOptions\((?:[^()]|\([^()]*\))*\)", "", text)
    text = re.sub(r"\[(?:enforce fail at )?[^\]\s]+\.(?:cc|cpp|h):\d+\] ", "", text)
    return " ".join(text.split())


def host_name(environ=os.environ) -> str:
    """The node's name: SLURM's (SLURMD_NODENAME, as in the job's node list) where there is one, else the host name."""
    return environ.get("SLURMD_NODENAME") or socket.gethostname()


def _gpu_uuids() -> tuple[str, ...]:
    if not torch.cuda.is_available():
        return ()
    uuids = []
    for i in range(torch.cuda.device_count()):
        uuid = getattr(torch.cuda.get_device_properties(i), "uuid", None)
        uuids.append(str(uuid) if uuid is not None else f"index {i}")  # older torch: the index is all there is
    return tuple(uuids)


def _route(address: str, port: int) -> tuple[str, str | None]:
    """The local address (and its interface's name) that this host would send from to `address`: a UDP socket's
    connect sends nothing, it only asks the kernel for the route."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((address, port))
        local = s.getsockname()[0]
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == local for a in addrs):
            return local, name
    return local, None


def local_report(env: DistEnv, environ=os.environ) -> Report:
    """This rank's Report, from `env` (workshop.dist's view of it) and what it can see without the others."""
    fields = dict(
        rank=env.rank, host=host_name(environ), local_rank=env.local_rank, world_size=env.world_size,
        device=env.device, backend=env.backend, launcher=env.launcher,
        cuda_visible_devices=environ.get("CUDA_VISIBLE_DEVICES"), gpu_uuids=_gpu_uuids(),
        socket_ifname=", ".join(f"{k}={environ[k]}" for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if k in environ)
        or None,
        omp_num_threads=environ.get("OMP_NUM_THREADS"), cpus=len(os.sched_getaffinity(0)),
    )
    cuda_count = torch.cuda.device_count() if env.device_type == "cuda" else 0
    found = world.layout(environ, {k: v for k, v in env.as_dict().items() if k not in ("device", "backend")},
                         cuda_count=cuda_count, backend=env.backend, cpus=fields["cpus"])
    fields.update(layout=tuple(f.text for f in found),
                  cannot_run=next((f.text for f in found if f.fatal and (cuda_count or not f.gpu)), None))
    if env.is_distributed:
        fields.update(master_addr=env.master_addr, master_port=env.master_port)
        try:
            infos = socket.getaddrinfo(env.master_addr, env.master_port, type=socket.SOCK_STREAM)
            fields["resolves_to"] = tuple(dict.fromkeys(info[4][0] for info in infos))
        except socket.gaierror as err:
            fields["resolve_error"] = err.strerror or str(err)
        if fields.get("resolves_to"):
            try:
                fields["local_addr"], fields["interface"] = _route(fields["resolves_to"][0], env.master_port)
            except OSError as err:
                fields["route_error"] = err.strerror or str(err)
    return Report(**fields)


# --- what is wrong, from every rank's report ---------------------------------------------------------

def _ranks(reports: list[Report]) -> str:
    """"rank 3", "ranks 0 and 1", "ranks 0, 1 and 2"."""
    numbers = [str(r.rank) for r in sorted(reports, key=lambda r: r.rank)]
    if len(numbers) == 1:
        return f"rank {numbers[0]}"
    return f"ranks {', '.join(numbers[:-1])} and {numbers[-1]}"


def diagnose(reports: list[Report]) -> list[str]:
    """What is wrong with this world, one sentence each with what to do; [] when nothing is."""
    problems = []
    for r in sorted(reports, key=lambda r: r.rank):  # the layout's lines first, each once (a node's ranks agree)
        problems += [line for line in r.layout if line not in problems]
    by_host = defaultdict(list)
    for r in sorted(reports, key=lambda r: r.rank):
        by_host[r.host].append(r)

    for host, ranks in by_host.items():
        # One GPU per rank: the same GPU's UUID twice, or without GPUs, the same local rank (dist would give
        # both cuda:<local_rank> on a GPU node)
        same = defaultdict(list)
        for r in ranks:
            same[("gpu", r.gpu) if r.gpu else ("local rank", r.local_rank)].append(r)
        for (kind, key), group in same.items():
            if len(group) < 2:
                continue
            both = "both" if len(group) == 2 else "all"
            if kind == "gpu":
                problems.append(
                    f"{_ranks(group)} on {host} {both} use the GPU {key} ({', '.join(r.device for r in group)}): they "
                    "would share it, each with a fraction of its memory and time. Give every rank its own GPU: as many "
                    "GPUs per node as tasks per node (--gpus-per-node = --ntasks-per-node), and no CUDA_VISIBLE_DEVICES "
                    "that names the same GPU for every rank")
            else:
                problems.append(
                    f"{_ranks(group)} on {host} {both} have local rank {key}: they would share cuda:{key} on a GPU "
                    "node. Each rank on a node needs its own local rank (LOCAL_RANK under torchrun, SLURM_LOCALID "
                    "under srun): is something (the job script, a .bashrc) setting LOCAL_RANK for every rank?")

    versions = defaultdict(list)
    for r in reports:
        versions[r.torch_version].append(r)
    if len(versions) > 1:
        where = "; ".join(f"torch {v} on {_ranks(rs)} ({', '.join(sorted({r.host for r in rs}))})"
                          for v, rs in sorted(versions.items()))
        problems.append(f"the ranks run different torch versions: {where}. Activate the same environment on every "
                        "node (the job script's `conda activate` or `source .venv/bin/activate`, before srun)")

    return problems


# --- when the group cannot be formed ------------------------------------------------------------------

def _interfaces() -> str:
    names = []
    for name, addrs in sorted(psutil.net_if_addrs().items()):
        ips = [a.address.split("%")[0] for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)]
        if ips:
            names.append(f"{name} {ips[0]}")
    return ", ".join(names)


def checklist(report: Report) -> str:
    """What to check when a rank cannot join the group, in the order that finds most problems first."""
    if report.resolve_error:
        where = f"{report.master_addr} does not resolve here: is it spelled as in the job's node list?"
    elif report.local_addr:
        where = f"it reaches {report.master_addr} through {report.interface or 'an unnamed interface'} ({report.local_addr})"
    else:
        where = f"no route to {report.master_addr} from here ({report.route_error})"
    now = f"; now {report.socket_ifname}" if report.socket_ifname else ""
    items = [
        "the rendezvous host is the job's first node: `scontrol show hostnames $SLURM_JOB_NODELIST | head -1`;"
        " workshop.dist takes it under SLURM, and WORKSHOP_MASTER_ADDR (or torchrun's MASTER_ADDR / --master-addr)"
        " overrides it: unset it, or name that node",
        f"the port {report.master_port} is free there (`ss -ltn | grep {report.master_port}` on that node); "
        "WORKSHOP_MASTER_PORT (torchrun: --master-port) picks another",
        f"the interface is right: {where}. If the nodes talk over another network, name its interface in "
        f"GLOO_SOCKET_IFNAME (gloo) and NCCL_SOCKET_IFNAME (NCCL){now}. This host has: {_interfaces()}",
        "every rank started: one that crashed, or is still queued, leaves the others waiting (its log says which)",
    ]
    return "\n".join(["Check, in this order:", *(wrap(item, f"  {i}. ", "     ") for i, item in enumerate(items, 1))])


_began = time.monotonic()  # when the rank began to join: how long a failure took to show counts from it


def _say_cannot_join(report: Report, what: str) -> None:
    took = f" [{time.monotonic() - _began:.1f} s after it began to join]"
    print(f"{wrap(f'rank {report.rank} on {report.host}: {what}{took}')}\n{checklist(report)}", file=sys.stderr, flush=True)


def _give_up(report: Report, what: str) -> None:
    """The watchdog's end: the main thread is inside torch's rendezvous and cannot be interrupted from here,
    so the process ends at once (its store's threads with it)."""
    _say_cannot_join(report, what)
    sys.stdout.flush()
    os._exit(EXIT_NO_GROUP)


# --- joined: the all-reduce ---------------------------------------------------------------------------------

def check_allreduce(env: DistEnv, nbytes: int, repeats: int = 5) -> dict:
    """All-reduce a float32 tensor of `nbytes` whose sum is known in closed form: element i of rank r's copy
    holds (r + 1) + i % 1024, so the sum is n(n+1)/2 + n (i % 1024), exact in float32 for n < 4096 ranks.
    Timed `repeats` times after one warm-up; an iteration lasts as long as its slowest rank, the time given is
    the fastest iteration. Every rank returns the same dict: bytes, exact, inexact_ranks, time_s, algbw_GBps,
    busbw_GBps."""
    n, w = max(1, nbytes // 4), env.world_size
    pattern = (torch.arange(n) % _PATTERN).float()
    expected = w * (w + 1) / 2 + w * pattern
    mine = (env.rank + 1 + pattern).to(env.device)
    exact, times = True, []
    for _ in range(repeats + 1):  # the first sets up the connections' buffers: untimed
        buf = mine.clone()
        dist.barrier()  # line the ranks up, or the first one in measures the wait for the last
        with metrics.Timer(env.device) as t:
            tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
        exact = exact and torch.equal(buf.cpu(), expected)
        times.append(t.elapsed)
    every = [None] * w
    tdist.all_gather_object(every, (exact, times[1:]))
    slowest = [max(rank_times[i] for _, rank_times in every) for i in range(repeats)]
    time_s = min(slowest)
    alg = collectives.algbw(n * 4, time_s)
    inexact = [r for r, (ok, _) in enumerate(every) if not ok]
    return {"bytes": n * 4, "exact": not inexact, "inexact_ranks": inexact, "time_s": time_s, "algbw_GBps": alg,
            "busbw_GBps": collectives.busbw(alg, w)}


def format_ranks(reports: list[Report]) -> str:
    """One line per rank: where it runs, what it would use, how it reaches the rendezvous host."""
    # CUDA_VISIBLE_DEVICES and OMP_NUM_THREADS shortened in the header: a rank's line fits tables.WIDTH columns
    head = ("rank", "host", "local", "device", "GPU", "GPUs", "CUDA_VISIBLE", "rendezvous", "interface",
            "OMP threads", "CPUs", "torch")
    rows = []
    for r in sorted(reports, key=lambda r: r.rank):
        rendezvous = f"{r.master_addr}:{r.master_port}" if r.master_addr else "-"
        interface = f"{r.interface or '?'} {r.local_addr}" if r.local_addr else "-"
        rows.append((str(r.rank), r.host, str(r.local_rank), r.device, (r.gpu or "-")[:13], str(len(r.gpu_uuids)),
                     r.cuda_visible_devices or "-", rendezvous, interface, r.omp_num_threads or "-", str(r.cpus),
                     r.torch_version))
    return table(head, rows, align="l" * len(head))


def format_problems(problems: list[str]) -> str:
    """`diagnose`'s problems as a bulleted list, each wrapped to tables.WIDTH columns under its bullet."""
    return "\n".join(wrap(p, "  - ", HANGING) for p in problems)


def format_exact_allreduce(result: dict, env: DistEnv, repeats: int) -> str:
    size = f"{result['bytes'] / 2**20:.1f} MiB float32"
    if not result["exact"]:
        return (f"all-reduce of {size}: the sum is WRONG on rank(s) {result['inexact_ranks']}: the network or the "
                "backend corrupts data; run again with WORKSHOP_BACKEND=gloo to tell NCCL from the program")
    return (f"all-reduce of {size} on {env.world_size} ranks ({env.backend}): sum exact; {result['time_s'] * 1e3:.2f} ms, "
            f"algbw {result['algbw_GBps']:.3f} GB/s, busbw {result['busbw_GBps']:.3f} GB/s (fastest of {repeats})")


# --- the command ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workshop.launch.doctor", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=positive(float), default=30.0,
                        help="seconds a rank waits for the others to join the group (default 30)")
    parser.add_argument("--mib", type=positive(float), default=4.0, help="size of the all-reduced tensor in MiB (default 4)")
    parser.add_argument("--repeats", type=positive(int), default=5, help="timed all-reduces; the fastest counts (default 5)")
    return parser


def main(argv: list[str] | None = None) -> int:
    global _began
    _began = time.monotonic()
    args = build_parser().parse_args(argv)  # bad arguments: a message and exit 2, before any rank waits
    try:
        env = dist.detect()
    except RuntimeError as err:  # more local ranks than GPUs: no device for this rank
        print(wrap(f"rank {os.environ.get('RANK', os.environ.get('SLURM_PROCID', '?'))} on {host_name()}: {err}"),
              file=sys.stderr, flush=True)
        return EXIT_NO_GROUP
    report = local_report(env)
    if report.cannot_run and not report.resolve_error:  # a layout no group survives: said now, not after a timeout
        _say_cannot_join(report, f"{report.cannot_run}; this rank stops now.")
        return EXIT_NO_GROUP
    if report.resolve_error:
        _say_cannot_join(report, f"the rendezvous host {report.master_addr!r} does not resolve "
                                 f"({report.resolve_error}): no rank can reach it, so this rank stops now.")
        return EXIT_NO_GROUP
    where = f"the process group of {env.world_size} ranks at {env.master_addr}:{env.master_port}"
    _began = time.monotonic()
    # torch's store retries past its timeout (a connect that times out, then backoff: 5 s became 11 s with
    # torch 2.14), so the bound is kept here: at --timeout, say so and end this process
    watchdog = threading.Timer(args.timeout, _give_up, (report, f"could not join {where} within {args.timeout:g} s"))
    watchdog.daemon = True
    watchdog.start()
    try:
        dist.init(env, timeout_s=args.timeout, check=False)  # the layout is this command's own report
    except Exception as err:  # a refused connection, a bad interface, a timeout: say which, and what to check
        watchdog.cancel()
        detail = short_error(str(err).strip().splitlines()[0]) if str(err).strip() else ""
        if "EADDRINUSE" in detail:  # rank 0 could not open the rendezvous port: something else listens on it
            _say_cannot_join(report, f"the port {env.master_port} is already taken on {report.host}: another process "
                                     f"listens on it, so rank 0 cannot open {where} ({type(err).__name__}: {detail})")
        else:
            _say_cannot_join(report, f"could not join {where} ({type(err).__name__}: {detail})")
        return EXIT_NO_GROUP
    watchdog.cancel()
    try:
        reports = [None] * env.world_size
        tdist.all_gather_object(reports, report)
        problems = diagnose(reports)
        result = check_allreduce(env, int(args.mib * 2**20), args.repeats) if env.is_distributed else None
        if env.is_main:
            print(f"workshop.doctor: {dist.describe(env)}")
            print(format_ranks(reports))
            print(format_exact_allreduce(result, env, args.repeats) if result
                  else "all-reduce: one process, nothing to reduce with")
            if problems:
                print(f"{len(problems)} problem(s):")
                print(format_problems(problems))
            elif result is None or result["exact"]:
                print("nothing wrong found")
            sys.stdout.flush()
        return EXIT_PROBLEMS if problems or (result and not result["exact"]) else EXIT_OK
    finally:
        dist.cleanup()


if __name__ == "__main__":
    sys.exit(main())
