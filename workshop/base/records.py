"""A run's `record.json`, as types: `Record` (one run: what ran, where, how it ended, what it measured) and
`Measurement` (one configuration it measured: the keys the scaling report reads). Plain Python, no torch: the
launcher writes records too, before and after the notebook's own.

    records.write(run, records.Record(notebook="05_ddp", status="ok", params={...}, results={...}))
    records.read(run / "record.json").status          # "ok"

Records are strict JSON: a NaN or infinite number is stored as null and named under `non_finite`, with why.
A record that breaks the schema (an unknown status, a throughput that is text, a measurement that is not an
object) is refused when it is written, naming the key, so a notebook fails where the mistake is made rather
than the report later; a record on disk that breaks it is read as an error that the report lists."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from dataclasses import dataclass, field, fields
from pathlib import Path

from workshop.base.runs import atomic_write_text

STATUSES = ("running", "ok", "failed", "interrupted", "incomplete")
"""running: the launcher's first record, until the run ends (a run killed with SIGKILL keeps it, and the report
calls it incomplete); ok; failed (a rank failed: `reason` says which, in which cell); interrupted (a signal:
SIGUSR1 before a time limit, SIGINT, SIGTERM)."""
UNITS = ("samples", "tokens")
MEMORY_KINDS = ("cuda", "tensors", "resident set")


class RecordError(ValueError):
    """A record that does not follow the schema, or that cannot be read."""


@dataclass(frozen=True)
class Measurement:
    """One measured configuration (a record's `results`, or one item of `results.measurements`, whose keys the
    record's `results` fill in where it leaves them out). Every field may be missing but `throughput`, for a
    measurement the report plots; other keys beside these are kept in the record and not read by the report."""

    throughput: float | None = None  # global samples/s or tokens/s of the run (all ranks together)
    samples_or_tokens: str | None = None  # the unit of throughput, one of UNITS (default "samples")
    model: str | None = None  # the model's name (default: params.model_name or params.model)
    strategy: str | None = None  # "single", "ddp", "fsdp", "tp", "dataparallel", ... (default: "single" on one device)
    global_batch_size: float | None = None  # samples (or sequences) per optimizer step, all ranks together
    micro_batch_size: float | None = None  # per device; the series key (default global_batch_size / devices)
    step_time_s: float | None = None  # seconds per optimizer step
    wall_time_s: float | None = None  # seconds the measured part took
    peak_memory_bytes: float | list | None = None  # per rank: a number, or a list in rank order (the largest shown)
    # what peak_memory_bytes counts, one of MEMORY_KINDS: "cuda" (tensors allocated on the GPU), "tensors" (the
    # tensor bytes a rank holds, workshop.measure.memory's count on CPU) or "resident set" (the process's, Python and
    # libraries included; the default on CPU). The report plots the first two only: a resident set grows with
    # what ran before, and looks like a saving when it is not.
    memory_kind: str | None = None
    world_size: int | None = None  # devices used (default: the record's dist.world_size)
    num_nodes: int | None = None  # nodes used
    epoch_size: float | None = None  # samples (or tokens) in an epoch: gives device-hours per epoch
    variant: str | None = None  # a label beside the strategy (notebook 02's variants)
    # true on the measurement a series' speedups are taken against (default: the series' first one-device
    # "single" measurement, else any one-device one)
    baseline: bool | None = None

    @classmethod
    def from_dict(cls, values: dict, where: str = "results") -> "Measurement":
        """The schema's keys of `values`, checked: a number where a number belongs (null for one that was not
        finite), text where text belongs, a unit and memory kind from their lists."""
        if not isinstance(values, dict):
            raise RecordError(f"{where} must be a JSON object, got {type(values).__name__}")
        out = {}
        for f in fields(cls):
            if f.name not in values or values[f.name] is None:
                continue
            value, key = values[f.name], f"{where}.{f.name}"
            if f.name in ("model", "strategy", "variant", "samples_or_tokens", "memory_kind"):
                if not isinstance(value, str):
                    raise RecordError(f"{key} must be text, got {value!r}")
                choices = {"samples_or_tokens": UNITS, "memory_kind": MEMORY_KINDS}.get(f.name)
                if choices and value not in choices:
                    raise RecordError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
            elif f.name == "baseline":
                if not isinstance(value, bool):
                    raise RecordError(f"{key} must be true or false, got {value!r}")
            elif f.name == "peak_memory_bytes" and isinstance(value, (list, tuple)):
                value = [_number(v, f"{key}[{i}]") for i, v in enumerate(value)]
            else:
                value = _number(value, key)
                if f.name in ("world_size", "num_nodes") and value is not None and (value != int(value) or value < 1):
                    raise RecordError(f"{key} must be a whole number of at least 1, got {value!r}")
                value = int(value) if f.name in ("world_size", "num_nodes") and value is not None else value
            out[f.name] = value
        return cls(**out)

    def or_else(self, defaults: "Measurement") -> "Measurement":
        """This measurement, with `defaults`' value wherever this one has none; its throughput, variant and
        baseline are its own (OWN), never filled in."""
        return Measurement(**{f.name: v if (v := getattr(self, f.name)) is not None or f.name in OWN
                              else getattr(defaults, f.name) for f in fields(self)})


OWN = ("throughput", "variant", "baseline")


def _number(value, key: str) -> float | None:
    """A finite number, or None for a null (what a non-finite number is stored as); text or a bool is an error."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RecordError(f"{key} must be a number, got {value!r}")
    return value if math.isfinite(value) else None


@dataclass
class Record:
    """One run's record.json. The lesson's own numbers go in `results` (with `measurements` for the report);
    the launcher's facts (its `run` metadata, `launcher` host and pid) and a sweep's (`sweep`, `config`, `task`)
    go in `extra`, written beside the fixed keys."""

    notebook: str  # the notebook's name without .ipynb ("05_ddp"), or a benchmark's ("bench-strategies")
    status: str  # one of STATUSES
    params: dict = field(default_factory=dict)  # the parameters the run was given
    results: dict = field(default_factory=dict)  # what it measured (numbers only from measurements)
    reason: str | list | None = None  # why it failed or was interrupted, or what a running record waits for
    time: str | None = None  # when it was written, ISO 8601 with the zone
    dist: dict | None = None  # the world (workshop.dist.DistEnv.as_dict())
    hardware: dict | None = None
    versions: dict | None = None
    git: str | None = None  # the revision, "+dirty" with uncommitted changes
    slurm_job_id: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Refuse what breaks the schema, naming the key."""
        if not isinstance(self.notebook, str) or not self.notebook:
            raise RecordError(f"notebook must be a name, got {self.notebook!r}")
        if self.status not in STATUSES:
            raise RecordError(f"status must be one of {', '.join(STATUSES)}, got {self.status!r}")
        for name in ("params", "results", "extra"):
            if not isinstance(getattr(self, name), dict):
                raise RecordError(f"{name} must be a JSON object, got {type(getattr(self, name)).__name__}")
        for name in ("dist", "hardware", "versions"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise RecordError(f"{name} must be a JSON object, got {type(getattr(self, name)).__name__}")
        clash = set(self.extra) & {f.name for f in fields(self)}
        if clash:
            raise RecordError(f"extra repeats the record's own keys: {', '.join(sorted(clash))}")
        self.measurements()

    def measurements(self) -> list[Measurement]:
        """What the run measured for the report: its `results` when they hold a throughput, then each of
        `results.measurements`, the results filling in what one leaves out."""
        defaults = Measurement.from_dict(self.results)
        items = self.results.get("measurements") or []
        if not isinstance(items, list):
            raise RecordError(f"results.measurements must be a list, got {type(items).__name__}")
        own = [defaults] if defaults.throughput is not None else []
        return own + [Measurement.from_dict(m, f"results.measurements[{i}]").or_else(defaults)
                      for i, m in enumerate(items)]

    def as_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**values, **self.extra}

    @classmethod
    def from_dict(cls, values: dict) -> "Record":
        if not isinstance(values, dict):
            raise RecordError(f"a record must be a JSON object, got {type(values).__name__}")
        names = {f.name for f in fields(cls)} - {"extra"}
        if "notebook" not in values or "status" not in values:
            raise RecordError("a record names its notebook and its status")
        return cls(**{k: v for k, v in values.items() if k in names},
                   extra={k: v for k, v in values.items() if k not in names})


def finite_only(value, where: str = "", found: dict | None = None):
    """`value` with every NaN or infinite float replaced by None, so that it is strict JSON (a reader in
    another language refuses NaN); `found` collects where each was and what it was ("results.val_loss": "nan")."""
    if isinstance(value, float) and not math.isfinite(value):
        if found is not None:
            found[where] = repr(value)
        return None
    if isinstance(value, dict):
        return {k: finite_only(v, f"{where}.{k}" if where else str(k), found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_only(v, f"{where}[{i}]", found) for i, v in enumerate(value)]
    return value


def digest(path: Path) -> str:
    """A short fingerprint of a record.json's bytes: the same digest, the same record (the committed notebooks and
    the report that read them name their records by it)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def write(run: Path, record: Record) -> Path:
    """`run/record.json`, whole or not at all, strict JSON: a non-finite number becomes null, named under
    `non_finite` with why."""
    record.check()
    non_finite: dict = {}
    values = finite_only(record.as_dict(), found=non_finite)
    if non_finite:
        values["non_finite"] = {**values.get("non_finite", {}),
                                **{where: f"{value}: not a number JSON can hold, stored as null"
                                   for where, value in non_finite.items()}}
    path = Path(run) / "record.json"
    atomic_write_text(path, json.dumps(values, indent=2, default=str, allow_nan=False) + "\n")
    return path


def read(path: Path) -> Record:
    """The record at `path` (a record.json, or the run folder that holds one); RecordError where it cannot be
    read or breaks the schema."""
    path = Path(path)
    path = path / "record.json" if path.is_dir() else path
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RecordError(f"unreadable record.json: {err}") from err
    return Record.from_dict(values)


def status(run: Path) -> str | None:
    """The status in `run`'s record.json, or None where there is none or it cannot be read."""
    try:
        return read(run).status
    except RecordError:
        return None

