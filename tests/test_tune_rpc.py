"""Tuning over TVM RPC for an aarch64 board, against the emulated aarch64 RPC server
(tvm_intlstm.runtime.rpc.EmulatedRPCServer: TVM's RPC server side under qemu-aarch64 on
127.0.0.1, the protocol of `python -m tvm.exec.rpc_server` on a board).

* a tiny quantized LSTM (16 -> 32, + a linear head) tuned for "rpi5" with 3 trials per task:
  every candidate cross-compiled here and measured on the emulated Cortex-A76; the records carry
  measured times; resuming adds nothing; compile(..., target="rpi5", tuning_logs=) uses them and
  the exported module is bit-exact with the reference under qemu;
* the same for this machine's CPU through TVM's own Python RPC server on loopback;
* the runner alone: a candidate that dies with SIGILL (sdot on an emulated Cortex-A72), outlasts
  the session timeout or gives a wrong result is one failed trial, the next candidate gets a new
  session;
* clear, quick errors: nothing listening, a wrong key, a server that never answers, a server that
  cannot run the target's code, a non-host target without rpc=.

Timings under qemu mean nothing; these tests check the plumbing a board uses.
Needs the tools of .ci/install_arm.sh.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import s_tir
from tvm.s_tir.meta_schedule.arg_info import ArgInfo
from tvm.s_tir.meta_schedule.runner import RunnerInput
from tvm.script import tirx as T

import tvm_intlstm as til
from tvm_intlstm.runtime.emulate import run_emulated
from tvm_intlstm.runtime.rpc import EmulatedRPCServer, RPCConnectError, check_server
from tvm_intlstm.target import export_library, parse_target
from tvm_intlstm.tuning import (GemmTask, RPCConfig, RPCTuningError, TuningLogWarning,
                                apply_tuning_logs, tune)
from tvm_intlstm.tuning import gemm as G
from tvm_intlstm.tuning._ms import rpc_classes
from tvm_intlstm.tuning.cli import cli_tune
from tvm_intlstm.tuning.database import RECORD_FILE, WORKLOAD_FILE, open_database, records
from tvm_intlstm.tuning.targets import target_key

TARGET = "rpi5"                     # cortex-a76 +dotprod: runs on qemu -cpu cortex-a76
TRIALS = 3
SESSION_TIMEOUT = 120               # seconds per candidate session on the emulated server


def _space_error(isa: str) -> str | None:
    """Why gemm.design_spaces cannot schedule a GEMM for `isa` (None: it can)."""
    G.register_intrinsics()
    try:
        G.design_spaces(s_tir.Schedule(GemmTask(16, 128, "int16", 24).workload()), isa, 128)
        return None
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: " + next(
            (ln for ln in str(e).splitlines() if ln.startswith("Error message:")),
            str(e).strip().splitlines()[-1])


def _assert_aarch64_space():
    """The aarch64 design space must schedule (it once failed: vectorize after decompose_reduction)."""
    why = _space_error("neon_dotprod")
    assert why is None, f"gemm.design_spaces cannot schedule isa 'neon_dotprod' (aarch64): {why}"


@pytest.fixture(scope="module")
def tools():
    missing = [t for t in ("aarch64-linux-gnu-g++", "qemu-aarch64") if shutil.which(t) is None]
    assert not missing, f"missing {missing}: run `bash .ci/install_arm.sh`"


@pytest.fixture(scope="module")
def a76_server(tools):
    with EmulatedRPCServer("127.0.0.1", 0, cpu="cortex-a76", verbose=False) as srv:
        yield srv
    assert not srv.is_alive()


def _rpc(srv, **kw):
    """Fast settings for qemu: 2 x 2 calls per candidate."""
    return RPCConfig(srv.host, srv.port, srv.key, timeout=SESSION_TIMEOUT, number=2, repeat=2,
                     min_repeat_ms=0, **kw)


class TinyLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(16, 32)
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        return self.head(self.lstm(x)[0])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    q = til.quantize(TinyLSTM().eval(), [torch.randn(6, 2, 16) for _ in range(3)])
    return q, (torch.randn(8, 2, 16),)


@pytest.fixture(scope="module")
def tuned(model, a76_server, tmp_path_factory):
    """tune(q, "rpi5", rpc=<emulated A76>) with 3 trials per task into a fresh database."""
    _assert_aarch64_space()
    q, example = model
    d = str(tmp_path_factory.mktemp("rpc_tl") / "cortex-a76")
    lines: list[str] = []
    sessions0 = len(a76_server.sessions())
    t0 = time.perf_counter()
    report = tune(q, TARGET, example, trials=TRIALS, log_dir=d, trials_per_iter=TRIALS, seed=0,
                  rpc=_rpc(a76_server), log=lines.append)
    return {"dir": d, "report": report, "lines": lines, "secs": time.perf_counter() - t0,
            "sessions": lambda: a76_server.sessions()[sessions0:]}


def _lines(d, f):
    with open(os.path.join(d, f)) as fh:
        return fh.read().splitlines()


def test_rpc_tuning_writes_measuredrecords(tuned, model):
    d, report = tuned["dir"], tuned["report"]
    # the LSTM's input projection (16 -> 4*32, int16) and the head (32 -> 8, int32)
    assert {(r["task"].K, r["task"].O, r["task"].out_dtype) for r in report} == \
        {(16, 128, "int16"), (32, 8, "int32")}
    assert all(r["trials_before"] == 0 and r["trials_run"] == TRIALS for r in report)
    assert all(r["best_us"] is not None and r["best_us"] > 0 for r in report)
    assert len(_lines(d, WORKLOAD_FILE)) == 2
    recs = [json.loads(line) for line in _lines(d, RECORD_FILE)]
    assert len(recs) == 2 * TRIALS
    want = target_key(parse_target(TARGET))
    db = records(open_database(d))
    assert len(db) == 2 * TRIALS
    for gemm, rtgt, secs, _ in db:
        assert gemm is not None and target_key(rtgt) == want
        assert secs is not None and 0 < secs < 1.0  # a measured time, not MetaSchedule's 1e10
    # every candidate was measured (none failed) in a session of its own that ended cleanly
    # (+1 session for the handshake check, +1 for the preflight kernel)
    out = "\n".join(tuned["lines"])
    assert "measured on the RPC server 127.0.0.1" in out and "0 failed" in out
    assert "unscheduled kernel runs there" in out
    _wait_for(lambda: len(tuned["sessions"]()) == 2 * TRIALS + 2)
    assert tuned["sessions"]() == ["exit status 0"] * (2 * TRIALS + 2)
    print(f"rpc tuning: {tuned['secs']:.1f} s\n" + out)


def _wait_for(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_resume_adds_no_trial_cli(tuned, model, a76_server, tmp_path):
    """The same tuning again through `tvm-intlstm tune --rpc host:port`: every task has its
    trials, nothing is measured, nothing is written, no session is opened."""
    q, example = model
    d = tuned["dir"]
    before = {f: open(os.path.join(d, f)).read() for f in (WORKLOAD_FILE, RECORD_FILE)}
    path = str(tmp_path / "tiny.qpt")
    til.save_quantized(q, path)
    n_sessions = len(a76_server.sessions())
    rc = cli_tune([path, "--example-shape", ",".join(str(v) for v in example[0].shape),
                   "--target", TARGET, "--rpc", f"{a76_server.host}:{a76_server.port}",
                   "--trials", str(TRIALS), "--log-dir", d])
    assert rc == 0
    after = {f: open(os.path.join(d, f)).read() for f in (WORKLOAD_FILE, RECORD_FILE)}
    assert after == before
    time.sleep(0.2)
    assert len(a76_server.sessions()) == n_sessions


def test_compile_with_rpc_logs_bit_exact_under_qemu(tuned, model, tmp_path):
    q, example = model
    d = tuned["dir"]
    tk = apply_tuning_logs(d, TARGET)
    assert sorted(tk.keys()) == [(16, 128, "int16"), (32, 8, "int32")]
    assert str(tk.get(16, 128, "int16").attrs["intlstm.isa"]) == "neon_dotprod"
    # the records are for the board only
    with pytest.warns(TuningLogWarning, match="only for"):
        assert len(apply_tuning_logs(d, "rpi4")) == 0
    cm = til.compile(q, TARGET, example, tuning_logs=d, verbose=False)
    script = cm.ir_module.script(show_meta=False)
    assert "tuned_linear_requant" in script and "tuned_linear_i32" in script
    lib = cm.export_library(tmp_path / "tiny_rpi5.so")
    ref = til.reference(q)
    for T_, B in ((8, 2), (3, 1)):
        x = np.random.default_rng(T_).standard_normal((T_, B, 16)).astype(np.float32)
        (y,) = run_emulated(lib, [x], cpu="cortex-a76", verbose=False)
        np.testing.assert_array_equal(y, ref(x))


def test_tune_x86_over_python_rpc_server(tmp_path):
    """The same path against TVM's own Python server (what `python -m tvm.exec.rpc_server` runs
    on a board), on loopback, for this machine's CPU: the library is linked with the host
    compiler, the records are this CPU's and replay to a bit-exact kernel."""
    from tvm.target import codegen

    from tvm_intlstm.kernels import build_kernel
    from tvm_intlstm.reference import ops as R
    from tvm_intlstm.runtime.rpc import start_local_server
    from tvm_intlstm.tuning.gemm import pack_weights

    target = f"llvm -mcpu={codegen.llvm_get_system_cpu()}"
    task = GemmTask(40, 24, "int16", 8, "test")
    server = start_local_server("127.0.0.1", port=9531, port_end=9599)
    lines: list[str] = []
    try:
        rpc = {"host": "127.0.0.1", "port": server.port, "timeout": 60, "number": 2,
               "repeat": 2, "min_repeat_ms": 0}
        rep = tune(None, target, tasks=[task], trials=TRIALS, trials_per_iter=TRIALS,
                   log_dir=str(tmp_path / "db"), rpc=rpc, seed=0, log=lines.append)
    finally:
        server.terminate()
    assert rep[0]["trials_run"] == TRIALS and rep[0]["best_us"] > 0
    assert "0 failed" in "\n".join(lines)
    assert all(r[2] is not None for r in records(open_database(str(tmp_path / "db"))))
    func = apply_tuning_logs(str(tmp_path / "db"), target).get(*task.key)
    k = build_kernel(func, parse_target(target))
    rng = np.random.default_rng(1)
    x = rng.integers(-128, 128, (13, 40)).astype(np.int8)
    W = rng.integers(-127, 128, (24, 40)).astype(np.int8)
    b = rng.integers(-(2**20), 2**20, 24).astype(np.int32)
    M = rng.integers(2**30, 2**31 - 1, 24).astype(np.int32)
    sh = rng.integers(8, 24, 24).astype(np.int32)
    args = [tvm.runtime.tensor(a) for a in (x, pack_weights(W), b, M, sh)]
    args.append(tvm.runtime.empty((13, 24), "int16", tvm.cpu()))
    k(*args)
    np.testing.assert_array_equal(args[-1].numpy(),
                                  R.requantize(R.linear_acc(x, W, b), M, sh, 16))


# ----------------------------------------------------------------------------------------------
# the runner alone: crashing and wrong candidates are failed trials
# ----------------------------------------------------------------------------------------------
K_, O_, N_ = 16, 4, 4


@T.prim_func
def _gemm_ok(x: T.Buffer((N_, K_), "int8"), w: T.Buffer((O_, K_), "int8"),
             b: T.Buffer((O_,), "int32"), y: T.Buffer((N_, O_), "int32")):
    T.func_attr({"tirx.noalias": True})
    for n, o in T.grid(N_, O_):
        y[n, o] = b[o]
        for k in range(K_):
            y[n, o] = y[n, o] + T.Cast("int32", x[n, k]) * T.Cast("int32", w[o, k])


@T.prim_func
def _gemm_sdot(x: T.Buffer((N_, K_), "int8"), w: T.Buffer((O_, K_), "int8"),
               b: T.Buffer((O_,), "int32"), y: T.Buffer((N_, O_), "int32")):
    """One sdot per row (not a GEMM: a wrong result where it runs, SIGILL without dotprod)."""
    T.func_attr({"tirx.noalias": True})
    for n in range(N_):
        y[n, 0:4] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
            b.vload([0], "int32x4"), x.vload([n, 0], "int8x16"), w.vload([0, 0], "int8x16"),
            dtype="int32x4")


@T.prim_func
def _gemm_slow(x: T.Buffer((N_, K_), "int8"), w: T.Buffer((O_, K_), "int8"),
               b: T.Buffer((O_,), "int32"), y: T.Buffer((N_, O_), "int32")):
    """Billions of dependent multiply-adds: far longer than a session timeout under qemu."""
    T.func_attr({"tirx.noalias": True})
    for n, o in T.grid(N_, O_):
        y[n, o] = b[o]
        for r in range(2000000000):
            y[n, o] = y[n, o] * 3 + T.Cast("int32", x[n, r % K_])


@pytest.fixture(scope="module")
def runner_libs(tools, tmp_path_factory):
    d = tmp_path_factory.mktemp("rpc_runner")
    target = parse_target(TARGET)
    libs = {}
    for name, f in (("ok", _gemm_ok), ("sdot", _gemm_sdot), ("slow", _gemm_slow)):
        f = f.with_attr("global_symbol", "main")
        libs[name] = export_library(tvm.compile(tvm.IRModule({"main": f}), target=target),
                                    d / f"{name}.so", target)
    return libs, ArgInfo.from_prim_func(_gemm_ok)


def _run(runner, libs, args_info, names, tmp_path):
    inputs = []
    for i, name in enumerate(names):    # the runner removes each artifact after measuring it
        p = tmp_path / f"{i}_{name}.so"
        shutil.copy(libs[name], p)
        inputs.append(RunnerInput(str(p), "llvm", args_info))
    results = [f.result() for f in runner.run(inputs)]
    assert not any(os.path.exists(i.artifact_path) for i in inputs)
    return results


def test_sigill_candidate_is_a_failed_trial(runner_libs, tmp_path):
    """sdot on an emulated Cortex-A72: that candidate's session dies (SIGILL), it is reported as
    an error, the next candidate is measured in a new session, the server keeps serving."""
    libs, args_info = runner_libs
    _, Runner = rpc_classes()
    log: list[str] = []
    with EmulatedRPCServer(cpu="cortex-a72", verbose=False) as srv:
        runner = Runner(_rpc(srv), log.append)
        res = _run(runner, libs, args_info, ["ok", "sdot", "ok"], tmp_path)
        assert res[0].error_msg is None and res[2].error_msg is None
        assert all(r.run_secs and float(r.run_secs[0]) > 0 for r in (res[0], res[2]))
        assert res[1].run_secs is None and "session died" in res[1].error_msg
        assert "SIGILL" in res[1].error_msg and runner.deaths == 1 and runner.sessions == 3
        assert any("new session" in line for line in log)
        _wait_for(lambda: len(srv.sessions()) == 3)
        assert "Illegal instruction" in srv.sessions()[1] and srv.is_alive()


def test_wrong_result_is_a_failed_trial(runner_libs, a76_server, tmp_path):
    """The same sdot kernel where dotprod exists: it runs, but is not the GEMM: rejected."""
    libs, args_info = runner_libs
    _, Runner = rpc_classes()
    res = _run(Runner(_rpc(a76_server)), libs, args_info, ["sdot", "ok"], tmp_path)
    assert res[0].run_secs is None and "not bit-exact" in res[0].error_msg
    assert res[1].error_msg is None and float(res[1].run_secs[0]) > 0


def test_slow_candidate_is_a_failed_trial(runner_libs, a76_server, tmp_path):
    """A candidate that outlasts the session timeout: the server ends its session, the trial
    fails saying so, the next one is measured."""
    libs, args_info = runner_libs
    _, Runner = rpc_classes()
    cfg = RPCConfig(a76_server.host, a76_server.port, timeout=2, number=1, repeat=1,
                    min_repeat_ms=0)
    t0 = time.perf_counter()
    res = _run(Runner(cfg), libs, args_info, ["slow", "ok"], tmp_path)
    assert time.perf_counter() - t0 < 30
    assert res[0].run_secs is None and "session timeout of 2 s" in res[0].error_msg
    assert res[1].error_msg is None and float(res[1].run_secs[0]) > 0
    _wait_for(lambda: any("Alarm clock" in x for x in a76_server.sessions()))


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
TASK = GemmTask(16, 24, "int16", 8, "test")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_fast(tmp_path):
    port = _free_port()                       # nothing listens there
    for spec in (f"127.0.0.1:{port}", {"host": "127.0.0.1", "port": port, "timeout": 5}):
        t0 = time.perf_counter()
        with pytest.raises(RPCConnectError, match=f"cannot reach the RPC server at 127.0.0.1:"
                                                  f"{port}.*rpc_server --host 0.0.0.0"):
            tune(None, TARGET, tasks=[TASK], trials=2, log_dir=str(tmp_path / "db"), rpc=spec,
                 verbose=False)
        assert time.perf_counter() - t0 < 10
    assert not os.path.exists(tmp_path / "db" / RECORD_FILE) or \
        not open(tmp_path / "db" / RECORD_FILE).read()
    with pytest.raises(SystemExit, match="error: cannot reach the RPC server"):
        cli_tune(["--gemm", "16,24,int16,8", "--target", TARGET, "--rpc",
                  f"127.0.0.1:{port}", "--log-dir", str(tmp_path / "cli")])


def test_server_lost_mid_tuning(tools, tmp_path):
    """The server goes away after the preflight: the runner retries, then tuning ends with
    RPCConnectError saying how to resume (the database stays valid)."""
    _assert_aarch64_space()
    srv = EmulatedRPCServer(cpu="cortex-a76", verbose=False)

    def log(msg):
        if "unscheduled kernel runs there" in msg:
            srv.close()

    try:
        with pytest.raises(RPCConnectError, match=r"lost the RPC server .*2 attempts.*resume"):
            tune(None, TARGET, tasks=[TASK], trials=4, trials_per_iter=2,
                 log_dir=str(tmp_path / "db"), rpc=_rpc(srv, retries=1), log=log)
    finally:
        srv.close()
    assert open(tmp_path / "db" / RECORD_FILE).read() == ""


def test_silent_server_and_wrong_key(a76_server, tmp_path):
    with socket.socket() as s:                # accepts connections (backlog), never answers
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        t0 = time.perf_counter()
        with pytest.raises(RPCConnectError, match="did not answer the TVM RPC handshake"):
            check_server("127.0.0.1", s.getsockname()[1], timeout=1.0)
        assert time.perf_counter() - t0 < 5
    with pytest.raises(RPCConnectError, match="expects a different key"):
        tune(None, TARGET, tasks=[TASK], trials=2, log_dir=str(tmp_path / "db"),
             rpc=f"{a76_server.host}:{a76_server.port}:wrong-key", verbose=False)


def test_server_that_cannot_run_the_target(a76_server, tmp_path):
    """An x86_64 build sent to the aarch64 server: refused before any trial, clearly."""
    with pytest.raises(RPCTuningError, match="cannot run a kernel built for llvm -mtriple=x86_64"):
        tune(None, "llvm -mtriple=x86_64-linux-gnu -mcpu=haswell", tasks=[TASK], trials=2,
             log_dir=str(tmp_path / "db"), rpc=_rpc(a76_server), verbose=False)
    assert not open(tmp_path / "db" / RECORD_FILE).read() \
        if os.path.exists(tmp_path / "db" / RECORD_FILE) else True


def test_rpc_option_forms_and_host_only_error(tmp_path):
    assert RPCConfig.parse("board:9090") == RPCConfig("board", 9090)
    assert RPCConfig.parse("10.0.0.7:9091:rpi5") == RPCConfig("10.0.0.7", 9091, "rpi5")
    assert RPCConfig.parse("[::1]:9090").host == "::1"
    c = RPCConfig.parse({"host": "b", "port": "9090", "repeat": 5})
    assert c.port == 9090 and c.repeat == 5 and RPCConfig.parse(c) is c
    assert til.RPCConfig is RPCConfig
    for bad, match in (("board", "no port"), ("board:x", "bad port"), ("board:0", "bad port"),
                       ({"host": "b"}, "needs 'host' and 'port'"),
                       ({"host": "b", "port": 1, "nmber": 2}, "unknown RPC option"),
                       ({"host": "b", "port": 1, "repeat": 0}, "repeat >= 1")):
        with pytest.raises(ValueError, match=match):
            RPCConfig.parse(bad)
    with pytest.raises(TypeError):
        RPCConfig.parse(9090)
    # without rpc= a target this machine cannot run is refused, and the message says what to do
    with pytest.raises(ValueError, match=r"cannot tune for .*aarch64.*rpc=.*--rpc"):
        tune(None, TARGET, tasks=[TASK], trials=2, log_dir=str(tmp_path / "db"), verbose=False)


# ----------------------------------------------------------------------------------------------
# a fleet through TVM's RPC tracker (loopback: a tracker and two servers, no ARM tools needed)
# ----------------------------------------------------------------------------------------------
TRACKER_KEY = "intlstm-loop"


def _spawn(args, log_path):
    """`python -m <args>` in a session of its own, stderr+stdout to log_path."""
    import subprocess
    import sys

    with open(log_path, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _stop(proc):
    import signal
    import subprocess

    if proc.poll() is None:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)     # the server's forked session processes too
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """`python -m tvm.exec.rpc_tracker` and two `python -m tvm.exec.rpc_server --tracker ... --key
    intlstm-loop` on 127.0.0.1, as on a fleet of boards."""
    from tvm_intlstm.runtime.rpc import check_tracker

    d = tmp_path_factory.mktemp("fleet")
    port = _free_port()
    procs = {"tracker": _spawn(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port",
                                str(port), "--port-end", str(port + 1), "--silent"],
                               d / "tracker.log")}
    try:
        for i in (1, 2):
            sport = _free_port()
            procs[f"server{i}"] = _spawn(
                ["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(sport), "--port-end",
                 str(sport + 1), "--tracker", f"127.0.0.1:{port}", "--key", TRACKER_KEY],
                d / f"server{i}.log")
        deadline = time.monotonic() + 90
        while True:                  # each process imports tvm first (seconds on a busy machine)
            for name, p in procs.items():
                assert p.poll() is None, f"{name} exited: {open(d / f'{name}.log').read()}"
            try:
                if check_tracker("127.0.0.1", port, TRACKER_KEY, timeout=2) == 2:
                    break
            except RPCConnectError:
                pass
            assert time.monotonic() < deadline, "the tracker and its two servers did not start"
            time.sleep(0.5)
        yield {"port": port, "logs": {n: d / f"{n}.log" for n in procs}}
    finally:
        for p in procs.values():
            _stop(p)


def test_tune_through_tracker_measures_on_both_servers(fleet, tmp_path):
    """tune(..., rpc="tracker://127.0.0.1:<port>/intlstm-loop"): both servers registered under the
    key measure candidates (one thread each), the log is valid and replays to a kernel."""
    from tvm.target import codegen

    target = f"llvm -mcpu={codegen.llvm_get_system_cpu()}"
    task = GemmTask(40, 24, "int16", 8, "test")
    lines: list[str] = []
    rpc = {"host": "127.0.0.1", "port": fleet["port"], "key": TRACKER_KEY, "tracker": True,
           "timeout": 30, "number": 2, "repeat": 2, "min_repeat_ms": 0}
    t0 = time.perf_counter()
    rep = tune(None, target, tasks=[task], trials=6, trials_per_iter=6,
               log_dir=str(tmp_path / "db"), rpc=rpc, seed=0, log=lines.append)
    secs = time.perf_counter() - t0
    out = "\n".join(lines)
    print(f"tuning through the tracker: {secs:.1f} s\n{out}")
    assert rep[0]["trials_run"] == 6 and rep[0]["best_us"] > 0
    assert "through the RPC tracker 127.0.0.1" in out and "2 server(s) registered" in out
    assert "0 failed" in out
    per_server = next(ln for ln in lines if "sessions per server:" in ln)
    assert per_server.count("127.0.0.1:") == 2, per_server      # both servers measured
    # ... as the servers' own logs say (one load_module per session)
    loads = [open(fleet["logs"][f"server{i}"]).read().count("load_module") for i in (1, 2)]
    assert all(n >= 1 for n in loads) and sum(loads) >= 6, loads
    recs = records(open_database(str(tmp_path / "db")))
    assert len(recs) == 6 and all(r[2] is not None and r[2] > 0 for r in recs)
    assert apply_tuning_logs(str(tmp_path / "db"), target).get(*task.key) is not None


def test_tracker_errors(fleet, tmp_path):
    from tvm_intlstm.runtime.rpc import parse_tracker_address

    spec = f"tracker://127.0.0.1:{fleet['port']}/{TRACKER_KEY}"
    cfg = RPCConfig.parse(spec)
    assert cfg.tracker and cfg.key == TRACKER_KEY and cfg.port == fleet["port"]
    assert cfg.address == f"tracker 127.0.0.1:{fleet['port']} (key '{TRACKER_KEY}')"
    assert parse_tracker_address("tracker://[::1]:9190/rpi5") == ("::1", 9190, "rpi5")
    for bad, match in (("tracker://host:9190", "no device key"), ("tracker://host:9190/", "no device key"),
                       ("tracker://host/rpi5", "no port"), ("tracker://h:1:k/rpi5", "the key goes after")):
        with pytest.raises(ValueError, match=match):
            RPCConfig.parse(bad)
    with pytest.raises(ValueError, match="needs the device key"):
        RPCConfig("h", 9190, tracker=True)
    t0 = time.perf_counter()
    with pytest.raises(RPCConnectError, match=r"no server registered with key 'rpi5' \(keys "
                                              rf"there: '{TRACKER_KEY}' \(2\)\)"):
        tune(None, "llvm", tasks=[TASK], trials=2, log_dir=str(tmp_path / "db"),
             rpc=f"tracker://127.0.0.1:{fleet['port']}/rpi5", verbose=False)
    port = _free_port()
    with pytest.raises(RPCConnectError, match="cannot reach the RPC tracker.*rpc_tracker"):
        tune(None, "llvm", tasks=[TASK], trials=2, log_dir=str(tmp_path / "db"),
             rpc=f"tracker://127.0.0.1:{port}/rpi5", verbose=False)
    assert time.perf_counter() - t0 < 20
    with pytest.raises(SystemExit, match="error: .*has no server registered with key 'nope'"):
        cli_tune(["--gemm", "16,24,int16,8", "--target", "llvm", "--rpc",
                  f"tracker://127.0.0.1:{fleet['port']}/nope", "--log-dir", str(tmp_path / "cli")])
