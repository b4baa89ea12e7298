"""TVM RPC: run and time exported models on a remote device, bit-exact.

* aarch64: the C++ RPC server of tvm_intlstm.runtime.rpc under qemu-aarch64 on 127.0.0.1
  (cortex-a76 for the +dotprod build; cortex-a72 to see a SIGILL end only its session);
* x86_64: TVM's own Python RPC server (what `python -m tvm.exec.rpc_server` runs on a board)
  on 127.0.0.1, through the same client functions.

Every server is started by a fixture and killed at its end; every session has a timeout.
Needs the tools of .ci/install_arm.sh.
"""

from __future__ import annotations

import os
import shutil
import socket
import time

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm.script import relax as R

import tvm_intlstm as til
from tvm_intlstm.compiler import compile as til_compile
from tvm_intlstm.runtime.rpc import (
    EmulatedRPCServer,
    RemoteSessionError,
    RemoteTiming,
    RPCServerError,
    connect_vm,
    run_remote,
    start_local_server,
    time_remote,
)
from tvm_intlstm.target import export_library, parse_target

#: seconds after which a server ends a session (bounds every remote call of these tests)
SESSION_TIMEOUT = 180
V = 29
SHAPES = ((3, 11), (1, 4))


class SmallTagger(nn.Module):
    """embedding -> bidirectional LSTM (batch_first) -> final linear."""

    def __init__(self, E=16, H=16):
        super().__init__()
        self.embed = nn.Embedding(V, E)
        self.lstm = nn.LSTM(E, H, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * H, V)

    def forward(self, ids):
        h, _ = self.lstm(self.embed(ids))
        return self.head(h)


def _ids(batch, seq, seed):
    return np.random.default_rng(seed).integers(0, V, (batch, seq), dtype=np.int64)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    missing = [t for t in ("aarch64-linux-gnu-g++", "qemu-aarch64") if shutil.which(t) is None]
    assert not missing, f"missing {missing}: run `bash .ci/install_arm.sh`"
    torch.manual_seed(3)
    q = til.quantize(SmallTagger().eval(), [torch.randint(0, V, (2, 7)) for _ in range(3)])
    out = tmp_path_factory.mktemp("rpc_libs")
    example = (torch.as_tensor(_ids(2, 5, 0)),)
    libs = {}
    for name, target in (("rpi5", "rpi5"), ("x86", "host")):
        cm = til_compile(q, target, example, verbose=False)
        libs[name] = cm.export_library(out / f"tagger_{name}.so")
    ref = til.reference(q)
    cases = [(x, ref(x)) for x in (_ids(b, t, 10 + i) for i, (b, t) in enumerate(SHAPES))]
    return q, libs, cases


@pytest.fixture(scope="module")
def a76_server():
    with EmulatedRPCServer("127.0.0.1", 0, cpu="cortex-a76", verbose=False) as srv:
        yield srv
    assert not srv.is_alive()


def _port_is_closed(port):
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


# ----------------------------------------------------------------------------------------------
# aarch64 under qemu
# ----------------------------------------------------------------------------------------------


def test_run_remote_bit_exact_on_emulated_a76(model, a76_server):
    _, libs, cases = model
    for x, want in cases:
        got = run_remote(libs["rpi5"], [x], a76_server.host, a76_server.port,
                         session_timeout=SESSION_TIMEOUT)
        assert len(got) == 1 and got[0].dtype == np.int32
        np.testing.assert_array_equal(got[0], want)


def test_time_remote_on_emulated_a76(model, a76_server):
    _, libs, cases = model
    x, want = cases[0]
    t = time_remote(libs["rpi5"], [x], a76_server.host, a76_server.port, number=3, repeat=2,
                    session_timeout=SESSION_TIMEOUT)
    assert isinstance(t, RemoteTiming)
    assert len(t.results_us) == 2 and all(r > 0 for r in t.results_us)
    assert t.min_us <= t.median_us <= t.max_us
    np.testing.assert_array_equal(t.outputs[0], want)


def test_one_session_many_calls(model, a76_server):
    """connect_vm: one upload, several shapes and a torch input over one session; the session
    ends when the block exits."""
    _, libs, cases = model
    before = len(a76_server.sessions())
    with connect_vm(libs["rpi5"], a76_server.host, a76_server.port,
                    session_timeout=SESSION_TIMEOUT) as rvm:
        for x, want in cases:
            np.testing.assert_array_equal(rvm(x)[0], want)
        np.testing.assert_array_equal(rvm(torch.from_numpy(cases[1][0]))[0], cases[1][1])
        # the module's metadata (.json) is applied: ids are range-checked before sending
        with pytest.raises(IndexError, match="out of range"):
            rvm(np.array([[0, V]]))
        with pytest.raises(TypeError, match="token ids"):
            rvm(cases[0][0].astype(np.float32))
        with pytest.raises(ValueError, match="shape"):
            rvm(np.zeros((4,), np.int64))
    _wait_for(lambda: len(a76_server.sessions()) > before)
    assert a76_server.sessions()[-1] == "exit status 0"


def _wait_for(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _roundtrip(srv, **kw):
    """A session without any module: a tensor to the remote device and back."""
    sess = srv.connect(session_timeout=SESSION_TIMEOUT, **kw)
    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    np.testing.assert_array_equal(tvm.runtime.tensor(a, sess.cpu(0)).numpy(), a)


@tvm.script.ir_module
class NestedTuple:
    @R.function
    def main(a: R.Tensor(("n", 4), "int32"), b: R.Tensor((3,), "int8")):
        c = R.add(a, a)
        d = R.multiply(b, R.const(2, "int8"))
        return (c, (d, a))


def test_tuple_results_and_sessions_close(a76_server, tmp_path):
    """A nested tuple result arrives flattened in order (fetched with get_output over RPC),
    and every session is closed when run_remote returns: the server serves one session at a
    time, so a leaked session would block the next call until its timeout."""
    target = parse_target("rpi5")
    lib = export_library(tvm.compile(NestedTuple, target=target), tmp_path / "tuple.so", target)
    b = np.array([-128, 1, 63], dtype=np.int8)
    before = len(a76_server.sessions())
    for n in (1, 5):
        a = np.arange(4 * n, dtype=np.int32).reshape(n, 4)
        got = run_remote(lib, [a, b], a76_server.host, a76_server.port, session_timeout=60)
        want = [a + a, (b * np.int8(2)).astype(np.int8), a]
        assert [g.dtype for g in got] == [w.dtype for w in want]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
    _wait_for(lambda: len(a76_server.sessions()) >= before + 2)
    assert a76_server.sessions()[before:] == ["exit status 0"] * 2


def test_sigill_ends_only_the_session(model):
    """The +dotprod build on a Cortex-A72 (no dotprod): the session process dies with SIGILL,
    the client gets RemoteSessionError, the server keeps serving."""
    _, libs, cases = model
    with EmulatedRPCServer(cpu="cortex-a72", verbose=False) as srv:
        with pytest.raises(RemoteSessionError, match="SIGILL"):
            run_remote(libs["rpi5"], [cases[0][0]], srv.host, srv.port,
                       session_timeout=SESSION_TIMEOUT)
        _wait_for(lambda: srv.sessions())
        assert "Illegal instruction" in srv.sessions()[0]
        assert srv.is_alive()
        _roundtrip(srv)
        port, pid = srv.port, srv.pid
    assert not srv.is_alive()
    assert _port_is_closed(port)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped: no zombie either


def test_key_and_session_limit():
    with EmulatedRPCServer(key="rpi5-test", max_sessions=2, verbose=False) as srv:
        with pytest.raises(RuntimeError, match="cannot find server that matches key"):
            tvm.rpc.connect(srv.host, srv.port, key="other", session_timeout=30)
        _roundtrip(srv)  # srv.connect() passes the key
        _roundtrip(srv)
        _wait_for(lambda: not srv.is_alive())  # exits after max_sessions
        assert srv.sessions() == ["exit status 0"] * 2


def test_server_errors(a76_server):
    with pytest.raises(RPCServerError, match="no CPU model 'cortex-a999'"):
        EmulatedRPCServer(cpu="cortex-a999", verbose=False)
    with pytest.raises(RPCServerError, match="cannot listen"):
        EmulatedRPCServer(port=a76_server.port, verbose=False)  # port in use
    with pytest.raises(ValueError, match="whitespace"):
        EmulatedRPCServer(key="a b", verbose=False)
    with pytest.raises(FileNotFoundError):
        run_remote("/nonexistent/model.so", [], a76_server.host, a76_server.port)


# ----------------------------------------------------------------------------------------------
# x86_64 through TVM's own Python server (the board procedure, on loopback)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def python_server():
    server = start_local_server("127.0.0.1", port=9391, port_end=9499)
    try:
        yield server
    finally:
        server.terminate()


def test_python_server_loopback_x86(model, python_server):
    _, libs, cases = model
    for x, want in cases:
        got = run_remote(libs["x86"], [x], "127.0.0.1", python_server.port,
                         session_timeout=SESSION_TIMEOUT)
        np.testing.assert_array_equal(got[0], want)
    t = time_remote(libs["x86"], [cases[0][0]], "127.0.0.1", python_server.port,
                    number=5, repeat=3, session_timeout=SESSION_TIMEOUT)
    assert len(t.results_us) == 3 and t.median_us > 0
    np.testing.assert_array_equal(t.outputs[0], cases[0][1])
