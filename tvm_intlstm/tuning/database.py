"""The tuning database on disk: MetaSchedule's JSONDatabase, validated before TVM reads it.

Database. MetaSchedule's JSONDatabase in `log_dir` (database_workload.json,
database_tuning_record.json): one JSON line per workload / measured trial, only ever appended.
With resume=True, `trials` is the total per task and target: records already in the database count,
and the search starts from them, so an interrupted session continues where it stopped.

Robustness. `apply_tuning_logs` never raises for a bad database: a missing directory, a corrupt
file (bad JSON, wrong structure, unreadable by MetaSchedule) or records for other targets give a
`TuningLogWarning` and the default kernels (get() returns None). `tune` refuses a corrupt database
with a `TuningLogError` that says which file and line (it must not append to it).
"""
from __future__ import annotations

import json
import os

import numpy as np

from . import gemm as G
from ._ms import fast_tensor_intrin
from .tasks import GEMM_ATTR, LAYOUT, LAYOUT_W7

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"


class TuningLogError(ValueError):
    """A tuning database that cannot be used (corrupt, unreadable)."""


class TuningLogWarning(UserWarning):
    """A tuning database was ignored (or partly ignored); the default kernels are used."""



def validate_logs(log_dir: str) -> tuple[int, int]:
    """Check the two JSON-lines files of a MetaSchedule JSONDatabase without loading them into TVM:
    every line must be JSON of the right shape, every record must name an existing workload and the
    last line must be complete. Returns (workloads, records); raises TuningLogError."""
    counts = []
    for fname in (WORKLOAD_FILE, RECORD_FILE):
        path = os.path.join(log_dir, fname)
        n = 0
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TuningLogError(f"tuning database {path} is corrupt: not UTF-8 text ({e})") \
                    from None
            if text and not text.endswith("\n"):
                raise TuningLogError(
                    f"tuning database {path} is corrupt: its last line is incomplete (an interrupted "
                    "write?); remove that line or tune into a new log_dir")
            for i, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TuningLogError(
                        f"tuning database {path} is corrupt: line {i} is not JSON ({e.msg})") from None
                if fname == WORKLOAD_FILE:
                    ok = isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], str)
                else:
                    ok = (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], int)
                          and isinstance(obj[1], list) and 0 <= obj[0] < counts[0])
                if not ok:
                    raise TuningLogError(
                        f"tuning database {path} is corrupt: line {i} is not a MetaSchedule "
                        f"{'workload' if fname == WORKLOAD_FILE else 'tuning record'}")
                n += 1
        counts.append(n)
    return counts[0], counts[1]


def open_database(log_dir: str, create: bool = False):
    """The JSONDatabase of `log_dir` after validate_logs; TuningLogError if unusable."""
    from tvm.s_tir.meta_schedule.database import JSONDatabase  # pylint: disable=import-outside-toplevel

    if not os.path.isdir(log_dir):
        if not create:
            raise TuningLogError(f"no tuning database: {log_dir} is not a directory")
        os.makedirs(log_dir, exist_ok=True)
    validate_logs(log_dir)
    try:
        G.register_intrinsics()   # traces name it: parsing a record looks it up
        with fast_tensor_intrin():
            return JSONDatabase(os.path.join(log_dir, WORKLOAD_FILE),
                                os.path.join(log_dir, RECORD_FILE), allow_missing=True)
    except Exception as e:  # noqa: BLE001  # pylint: disable=broad-except
        raise TuningLogError(f"tuning database in {log_dir} cannot be loaded by MetaSchedule: "
                             f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}") from None


def gemm_of(workload_mod):
    try:
        f = workload_mod["main"]
        s = str(f.attrs[GEMM_ATTR])
    except Exception:  # noqa: BLE001  # pylint: disable=broad-except
        return None
    parts = s.split(",")
    if len(parts) != 5 or parts[4] not in (LAYOUT, LAYOUT_W7):
        return None    # another kernel form (e.g. an older database): not ours to replay
    K, O, dt, rows = parts[:4]
    return int(K), int(O), dt, int(rows), parts[4] == LAYOUT_W7


def records(db):
    """(gemm (K, O, dt, rows, w7) or None, target, mean run seconds or None, record) per
    record."""
    out = []
    for rec in db.get_all_tuning_records():
        secs = [float(v) for v in rec.run_secs] if rec.run_secs is not None else []
        ok = bool(secs) and all(np.isfinite(secs)) and max(secs) < 1e9
        out.append((gemm_of(rec.workload.mod), rec.target, float(np.mean(secs)) if ok else None,
                    rec))
    return out
