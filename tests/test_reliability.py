"""Reliability (issue 16): a .qpt model file is data (no code runs from it), fast-math targets are
refused, the test command installs what the tests need, non-finite / all-zero calibration data,
modules built for CPU features this machine lacks, and the smaller bad-input cases (numpy and T=0
calibration batches, corrupt .so.json, truncated .so, contradictory -mattr, CLI errors, bad
tuning defaults.json, `compile -o` into a missing directory)."""
import copy
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tvm_intlstm as til
from tvm_intlstm.target import TargetError, host_arch, missing_host_features, parse_target

REPO = Path(__file__).resolve().parents[1]


class TokenNet(nn.Module):
    """embedding -> BiLSTM -> layer norm -> transpose/contiguous -> LSTM -> permute -> final linear,
    plus h_n[-1]: a graph with modules, getitem, call_method and a tuple output."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.lstm = nn.LSTM(6, 8, batch_first=True, bidirectional=True)
        self.ln = nn.LayerNorm(16)
        self.lstm2 = nn.LSTM(16, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, ids):
        h, (hn, _) = self.lstm(self.emb(ids))
        t = self.ln(h).transpose(0, 1).contiguous()
        y, _ = self.lstm2(t)
        return self.head(y.permute(1, 0, 2)), hn[-1]


class FeatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h, _ = self.lstm(x)
        return self.head(h)


@pytest.fixture(scope="module")
def token_q():
    torch.manual_seed(0)
    return til.quantize(TokenNet().eval(), [torch.randint(0, 20, (2, 7)) for _ in range(2)])


@pytest.fixture(scope="module")
def feat_q():
    torch.manual_seed(1)
    return til.quantize(FeatNet().eval(), [torch.randn(5, 2, 6) for _ in range(2)])


@pytest.fixture(scope="module")
def feat_lib(feat_q, tmp_path_factory):
    """The feature model compiled for this machine and exported (path of the .so)."""
    cm = til.compile(feat_q, "llvm", (torch.randn(4, 1, 6),), verbose=False)
    return cm.export_library(tmp_path_factory.mktemp("lib") / "feat.so")


def _same(a, b):
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert torch.equal(a, b)


# --- 1. a .qpt file is data -------------------------------------------------------------------


def _blob(q, tmp_path):
    p = til.save_quantized(q, tmp_path / "m.qpt")
    return torch.load(p, weights_only=True)


def _save(blob, tmp_path, name="evil.qpt"):
    p = tmp_path / name
    torch.save(blob, p)
    return p


def test_qpt_placeholder_target_is_not_code(feat_q, tmp_path):
    marker = tmp_path / "pwned"
    blob = _blob(feat_q, tmp_path)
    ph = next(e for e in blob["nodes"] if e["op"] == "placeholder")
    ph["target"] = f"x=__import__('os').system('touch {marker}')"
    with pytest.raises(ValueError, match=r"node 0 .*placeholder.*identifier"):
        til.load_quantized(_save(blob, tmp_path))
    assert not marker.exists()
    ph["target"] = "torch"        # an identifier that would shadow what the generated code uses
    with pytest.raises(ValueError, match=r"node 0 .*placeholder.*identifier"):
        til.load_quantized(_save(blob, tmp_path))
    ph["target"] = "input"        # a builtin's name is a fine input name
    x = torch.randn(3, 1, 6)
    _same(til.load_quantized(_save(blob, tmp_path))(x), feat_q(x))


def test_qpt_method_chain_is_refused(feat_q, tmp_path):
    """x.__reduce_ex__(2)[0].__getattribute__('__globals__')['os'].__getattribute__('system')(cmd):
    every step a call_method / getitem node (on the old loader this ran on the first forward)."""
    marker = tmp_path / "pwned"
    blob = _blob(feat_q, tmp_path)
    x = next(e for e in blob["nodes"] if e["op"] == "placeholder")["name"]

    def node(op, name, target, *args):
        return {"op": op, "name": name, "target": target, "args": {"tuple": list(args)}, "kwargs": {}}

    chain = [node("call_method", "r", "__reduce_ex__", {"node": x}, 2),
             node("call_function", "f", "_operator.getitem", {"node": "r"}, 0),
             node("call_method", "g", "__getattribute__", {"node": "f"}, "__globals__"),
             node("call_function", "o", "_operator.getitem", {"node": "g"}, "os"),
             node("call_method", "s", "__getattribute__", {"node": "o"}, "system"),
             node("call_method", "c", "__call__", {"node": "s"}, f"touch {marker}")]
    blob["nodes"][-1:-1] = chain
    with pytest.raises(ValueError, match=r"node \d+ \('r', 'call_method'\).*method '__reduce_ex__' is not allowed"):
        q = til.load_quantized(_save(blob, tmp_path))
        q(torch.randn(3, 1, 6))      # the old loader accepted the file: the forward ran the command
    assert not marker.exists()
    # also each dunder step alone, and a kwargs name carrying code
    for step in ("__getattribute__", "__call__", "__globals__", "__class__"):
        b = copy.deepcopy(_blob(feat_q, tmp_path))
        b["nodes"][-1:-1] = [node("call_method", "r", step, {"node": x})]
        with pytest.raises(ValueError, match="is not allowed"):
            til.load_quantized(_save(b, tmp_path))
    b = copy.deepcopy(_blob(feat_q, tmp_path))
    b["nodes"][-1:-1] = [dict(node("call_method", "r", "contiguous", {"node": x}),
                              kwargs={f"a=__import__('os').system('touch {marker}'),b": 1})]
    with pytest.raises(ValueError, match="keyword argument name"):
        til.load_quantized(_save(b, tmp_path))
    assert not marker.exists()


def _payloads(marker):
    code = f"__import__('os').system('touch {marker}')"
    return [f"x={code}", code, f"x):\n    {code}\n    def f(y", "__reduce_ex__", "__getattribute__",
            "__globals__", "__call__", "__class__", "__init__", "system", "eval", "exec",
            "builtins.eval", "builtins.exec", "posix.system", "os.system", "torch.load",
            "subprocess.call", "_operator.attrgetter", "_operator.methodcaller", "get_attr",
            "call_module", "placeholder", "output", "root", "self", "import", "lambda", "1x", "a.b",
            "a b", "", None, 0, -1, 2.5, True, [], {}, {"node": "nope"}, {"node": code},
            {"slice": [code, None, None]}, {"tuple": [code]}, {"other": 1}, ["x", {"node": "x"}]]


def _mutate(blob, rng, marker):
    b = copy.deepcopy(blob)
    nodes = b["nodes"]
    names = [e["name"] for e in nodes]
    pay = _payloads(marker) + names
    kind = rng.randrange(7)
    i = rng.randrange(len(nodes))
    e = nodes[i]
    if kind == 0:
        e["op"] = rng.choice(["call_method", "call_function", "call_module", "placeholder", "get_attr",
                              "output", "root", "call_method"])
    elif kind == 1:
        e["name"] = rng.choice(pay)
    elif kind == 2:
        e["target"] = rng.choice(pay)
    elif kind == 3:
        args = list(e["args"]["tuple"]) if isinstance(e.get("args"), dict) else []
        if args and rng.random() < 0.5:
            args[rng.randrange(len(args))] = rng.choice(pay)
        else:
            args.append(rng.choice(pay))
        e["args"] = rng.choice([{"tuple": args}, args, {"tuple": args, "x": 1}])
    elif kind == 4:
        e["kwargs"] = {rng.choice([p for p in pay if isinstance(p, str)] or ["x"]): rng.choice(pay)}
    elif kind == 5:   # a new node before the output, on an earlier node
        src = rng.choice(names[:-1])
        nodes.insert(len(nodes) - 1, {"op": rng.choice(["call_method", "call_function"]), "name": "n_new",
                                      "target": rng.choice(pay + ["transpose", "_operator.getitem"]),
                                      "args": {"tuple": [{"node": src}, rng.choice(pay)]}, "kwargs": {}})
    else:             # drop or reorder nodes, or break a module
        r = rng.random()
        if r < 0.3:
            del nodes[i]
        elif r < 0.6:
            j = rng.randrange(len(nodes))
            nodes[i], nodes[j] = nodes[j], nodes[i]
        else:
            name = rng.choice(list(b["modules"]))
            spec = b["modules"][name]
            choice = rng.randrange(3)
            if choice == 0:
                spec["class"] = rng.choice(pay)
            elif choice == 1:
                spec["attrs"][rng.choice([p for p in pay if isinstance(p, str)] or ["x"])] = rng.choice(pay)
            else:
                b["modules"][str(rng.choice(pay))] = spec
    return b


def test_qpt_fuzzed_node_lists(token_q, tmp_path):
    """400 randomly mutated copies (1-3 mutations each) of a real model's node list (payloads that would `touch` a file):
    each loads with a ValueError naming the problem, or loads as a model whose forward fails or
    runs; no file is created in any case. The legit model still loads and gives the same outputs."""
    marker = tmp_path / "pwned"
    blob = _blob(token_q, tmp_path)
    ids = torch.randint(0, 20, (2, 6))
    rng = random.Random(16)
    outcomes = {"refused": 0, "loaded": 0}
    for k in range(400):
        b = blob
        for _ in range(rng.choice((1, 1, 2, 3))):      # one to three mutations
            b = _mutate(b, rng, marker)
        p = _save(b, tmp_path, "fuzz.qpt")
        try:
            q = til.load_quantized(p)
        except ValueError as e:
            assert str(p) in str(e)
            outcomes["refused"] += 1
            continue
        outcomes["loaded"] += 1
        try:
            q(ids)
        except Exception:  # noqa: BLE001 - a wrong but harmless graph may fail in forward
            pass
        assert not marker.exists(), f"mutation {k} ran code"
    assert not marker.exists()
    print(f"fuzzed .qpt files: {outcomes}")
    assert outcomes["refused"] > 300
    q2 = til.load_quantized(_save(blob, tmp_path, "legit.qpt"))
    _same(q2(ids), token_q(ids))


# --- 2. fast-math targets ------------------------------------------------------------------------


def test_compile_refuses_fast_math(feat_q):
    for spec in ("llvm -fast-math=1", "llvm -fast-math-nnan=1", {"kind": "llvm", "fast-math-contract": True}):
        with pytest.raises(ValueError, match="fast-math.*IEEE float32"):
            til.compile(feat_q, spec, (torch.randn(4, 1, 6),), verbose=False)
    from tvm_intlstm import kernels
    with pytest.raises(ValueError, match="fast-math.*IEEE float32"):      # the same check
        kernels.build_kernel(kernels.rescale_8(8, 3, 4), {"kind": "llvm", "fast-math": True})


# --- 4. the README's test command sets up apt packages itself --------------------------------------


def _fake_repo(tmp_path, missing):
    """A copy of .ci/ with pyproject.toml and an up-to-date fake venv, and fake dpkg-query /
    apt-get on PATH (dpkg-query reports every package installed except `missing`; apt-get logs)."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO / ".ci", repo / ".ci")
    shutil.copy(REPO / "pyproject.toml", repo / "pyproject.toml")
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "python").write_text("#!/bin/sh\nexit 0\n")
    import hashlib
    (repo / ".venv" / ".tvm_intlstm_stamp").write_text(
        hashlib.sha256((repo / "pyproject.toml").read_bytes()).hexdigest() + "\n")
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "apt.log"
    (fake / "dpkg-query").write_text(
        "#!/bin/bash\nfor a in \"$@\"; do case \"$a\" in -*) continue;; esac\n"
        f"  case \" {' '.join(missing)} \" in *\" $a \"*) ;; *) echo \"$a install ok installed\";; esac\n"
        f"  echo \"$a\" >> {tmp_path}/dpkg.log\ndone\n")
    (fake / "apt-get").write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    (fake / "sudo").write_text("#!/bin/sh\nexec \"$@\"\n")      # never the real apt-get, even as non-root
    for f in list(fake.iterdir()) + [repo / ".venv" / "bin" / "python"]:
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}")
    env.pop("TVM_INTLSTM_SKIP_APT", None)
    return repo, env, log


@pytest.mark.parametrize("missing", [[], ["python3.11-doc", "qemu-user"]])
def test_setup_venv_installs_test_packages(tmp_path, missing):
    repo, env, log = _fake_repo(tmp_path, missing)
    r = subprocess.run(["bash", ".ci/setup_venv.sh"], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    asked = (tmp_path / "dpkg.log").read_text().split() if (tmp_path / "dpkg.log").exists() else []
    for pkg in ("gcc-aarch64-linux-gnu", "g++-aarch64-linux-gnu", "libc6-dev-arm64-cross",
                "binutils-aarch64-linux-gnu", "qemu-user", "python3.11-doc"):
        assert pkg in asked, f"setup_venv.sh does not check {pkg}"
    calls = log.read_text().splitlines() if log.exists() else []
    if not missing:
        assert calls == []                 # nothing missing: no apt-get at all (quick second run)
    else:
        assert calls[0].startswith("update")
        assert sorted(calls[1].split()[-2:]) == sorted(missing)
    ci_run = (REPO / ".ci" / "run").read_text()
    assert "bash .ci/setup_venv.sh && .venv/bin/python -m pytest -q" in ci_run
    assert "apt-get" not in ci_run and "install_arm" not in ci_run


# --- 5. calibration data ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_calibration_rejects_non_finite(bad):
    torch.manual_seed(2)
    x = torch.randn(5, 2, 6)
    x[3, 1, 2] = bad
    with pytest.raises(ValueError, match=r"calibration batch 1, input 0 contains 1 non-finite"):
        til.quantize(FeatNet().eval(), [torch.randn(5, 2, 6), x])
    with pytest.raises(ValueError, match="non-finite"):       # QAT's observe batches too
        qat = til.prepare_qat(FeatNet().train())
        qat(x)


def test_calibration_rejects_non_finite_activation():
    m = FeatNet().eval()
    with torch.no_grad():
        m.lstm.weight_ih_l0[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite .*during calibration"):
        til.quantize(m, [torch.randn(5, 2, 6)])


def test_calibration_all_zero_warns():
    with pytest.warns(UserWarning, match="only zeros at .*quant_input.*falls back"):
        til.quantize(FeatNet().eval(), [torch.zeros(5, 2, 6)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        til.quantize(FeatNet().eval(), [torch.randn(5, 2, 6)])


# --- 7. modules built for CPU features this machine lacks -----------------------------------------


def test_module_for_missing_cpu_features_refused(feat_q, tmp_path):
    """A module for a CPU with features this one lacks: sapphirerapids implies AMX (amx-tile), which
    no AMD CPU has; znver3 implies sse4a, which no Intel CPU has (so one of the two is foreign on
    any x86 host). The first call and til.load raise, naming the features, before any of the
    module's code runs. (On an aarch64 host the x86 module is a cross build: also refused.)"""
    amx = "amx_tile" in open("/proc/cpuinfo").read()
    cpu, feature = ("znver3", "sse4a") if amx else ("sapphirerapids", "amx-tile")
    cm = til.compile(feat_q, f"llvm -mtriple=x86_64-linux-gnu -mcpu={cpu}", (torch.randn(4, 1, 6),),
                     verbose=False)
    if host_arch() != "x86_64":
        with pytest.raises(RuntimeError, match="cannot run on this"):
            cm(np.zeros((3, 1, 6), np.float32))
        return
    with pytest.raises(TargetError, match=rf"needs CPU feature\(s\) .*{feature}.*this CPU lacks"):
        cm(np.zeros((3, 1, 6), np.float32))
    path = cm.export_library(tmp_path / "foreign.so")   # exporting is not affected
    with pytest.raises(TargetError, match=rf"foreign.so was built for .*{cpu}.*{feature}"):
        til.load(path)


def test_missing_features_from_cpuinfo():
    assert missing_host_features("llvm") == []
    assert missing_host_features("host") == []
    other = "rpi5" if host_arch() == "x86_64" else "x86-avx2"
    assert missing_host_features(other) is None             # another architecture: a cross build
    amd = ("flags\t\t: fpu sse2 pni ssse3 sse4_1 sse4_2 avx avx2 fma bmi1 bmi2 abm movbe popcnt f16c "
           "adx sha_ni vaes vpclmulqdq sse4a\n")
    intel = amd.replace(" sse4a", "")
    assert missing_host_features("llvm -mcpu=znver3", cpuinfo=amd) == []
    assert missing_host_features("llvm -mcpu=znver3", cpuinfo=intel) == ["sse4a"]
    assert "avx512f" in missing_host_features("llvm -mcpu=skylake-avx512", cpuinfo=amd)
    a76 = "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\n"
    a72 = "Features\t: fp asimd evtstrm crc32 cpuid\n"
    assert missing_host_features("rpi5", cpuinfo=a76) == []
    assert "dotprod" in missing_host_features("rpi5", cpuinfo=a72)
    assert missing_host_features("aarch64-i8mm", cpuinfo=a76) == ["i8mm"]


# --- 8. smaller ones --------------------------------------------------------------------------------


def test_numpy_calibration_batches():
    torch.manual_seed(3)
    batches = [torch.randn(5, 2, 6) for _ in range(2)]
    m = FeatNet().eval()
    q1 = til.quantize(m, batches)
    q2 = til.quantize(m, [b.numpy() for b in batches])
    x = torch.randn(4, 1, 6)
    _same(q1(x), q2(x))
    with pytest.raises(TypeError, match="calibration batch 0, input 0: expected a torch.Tensor or numpy"):
        til.quantize(m, [[[1.0, 2.0]]])


def test_calibration_batch_with_no_time_steps():
    with pytest.raises(ValueError, match="sequence length 0"):
        til.quantize(FeatNet().eval(), [torch.randn(0, 2, 6)])


def test_corrupt_meta_json_names_the_file(feat_lib, tmp_path):
    so = tmp_path / "m.so"
    shutil.copy(feat_lib, so)
    Path(str(so) + ".json").write_text('{"format": "tvm_intlstm-1", "input_kinds": [')
    with pytest.raises(ValueError, match=r"m\.so\.json is not a valid tvm_intlstm module description"):
        til.load(so)
    from tvm_intlstm.runtime.inputs import check_inputs_for_library
    with pytest.raises(ValueError, match=r"m\.so\.json"):
        check_inputs_for_library(so, [np.zeros((2, 1, 6), np.float32)])


def test_truncated_library_is_refused(feat_lib, tmp_path):
    """A .so cut to 25 % (or 90 %) raises ValueError; run in a child process, as the old loader died
    with SIGBUS."""
    data = Path(feat_lib).read_bytes()
    meta = Path(feat_lib + ".json").read_text()
    paths = []
    for frac in (0.25, 0.9):
        p = tmp_path / f"cut{int(frac * 100)}.so"
        p.write_bytes(data[:int(len(data) * frac)])
        Path(str(p) + ".json").write_text(meta)
        paths.append(str(p))
    (tmp_path / "junk.so").write_bytes(b"\x7fELF" + b"\0" * 10)
    Path(str(tmp_path / "junk.so") + ".json").write_text(meta)
    paths.append(str(tmp_path / "junk.so"))
    code = ("import sys, tvm_intlstm as til\n"
            "for p in sys.argv[1:]:\n"
            "    try:\n        til.load(p); print('LOADED', p)\n"
            "    except ValueError as e:\n        print('ERR', e)\n")
    r = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, f"child died with {r.returncode}: {r.stderr[-2000:]}"
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("ERR") for line in lines), r.stdout
    assert "cut25.so is truncated or corrupt" in lines[0] and "cut90.so is truncated" in lines[1]
    assert "not a loadable TVM module" in lines[2]
    til.load(feat_lib)                     # the complete file still loads


def test_contradictory_mattr():
    with pytest.raises(TargetError, match=r"contradictory -mattr .*\+avx512f cannot be enabled together with -avx2"):
        parse_target("llvm -mattr=+avx512f,-avx2")
    with pytest.raises(TargetError, match=r"\+avx512foo .*not known to LLVM"):
        parse_target("llvm -mattr=+avx512foo")
    parse_target("llvm -mcpu=znver4 -mattr=-avx512vnni")       # removing a feature alone is fine


def test_cli_toolchain_error_is_one_line(feat_q, tmp_path, monkeypatch, capsys):
    from tvm_intlstm.cli import main
    qpt = til.save_quantized(feat_q, tmp_path / "m.qpt")
    monkeypatch.setenv("TVM_INTLSTM_CROSS_CXX", str(tmp_path / "no-such-g++"))
    with pytest.raises(SystemExit) as ei:
        main(["compile", qpt, "--example-shape", "4,1,6", "--target", "rpi5", "-o", str(tmp_path / "a.so")])
    msg = str(ei.value.code)
    assert msg.startswith("error: ") and "no-such-g++" in msg and "\n" not in msg


def test_cli_compile_output_directory(feat_q, tmp_path, capsys):
    """`compile -o` into a missing directory creates it and says so."""
    from tvm_intlstm.cli import main
    qpt = til.save_quantized(feat_q, tmp_path / "m.qpt")
    out = tmp_path / "new" / "sub" / "m.so"
    main(["compile", qpt, "--example-shape", "4,1,6", "-o", str(out)])
    printed = capsys.readouterr().out
    assert f"created directory {out.parent}" in printed and out.is_file()
    main(["compile", qpt, "--example-shape", "4,1,6", "-o", str(out)])     # exists now: no note
    assert "created directory" not in capsys.readouterr().out


@pytest.mark.parametrize("bad", [-1.0, 0.0, float("nan"), float("inf"), "fast"])
def test_tuning_defaults_json_rejects_bad_times(tmp_path, bad):
    from tvm_intlstm.tuning import apply_tuning_logs
    d = tmp_path / "znver3"
    shutil.copytree(REPO / "tuning_logs" / "znver3", d)
    data = json.loads((d / "defaults.json").read_text())
    for times in data.values():
        for k in times:
            times[k] = bad
    (d / "defaults.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"znver3/defaults\.json: default-kernel time .* is not a positive finite"):
        apply_tuning_logs(str(d), "llvm -mcpu=znver3")
