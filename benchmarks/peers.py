"""tvm_intlstm against its peers, side by side, in one run (issue: fast kernels + autotuning).

    .venv/bin/python benchmarks/peers.py [--threads 1,2] [--repeat 15] [--target host]
        [--kernels amx] [--tuning-logs tuning_logs/<host cpu>] [--litert-python /tmp/tfvenv/bin/python]
        [--md BENCHMARKS.md] [--plot docs/latency_vs_seq.png] [--json results.json]

The same float nn.LSTM (seeded random weights) on:

  PyTorch FP32 nn.LSTM | PyTorch torch.ao.quantization.quantize_dynamic (int8 weights, float
  activations) | ONNX Runtime FP32 (torch.onnx.export, TorchScript exporter) | ONNX Runtime
  onnxruntime.quantization.quantize_dynamic (DynamicQuantizeLSTM) | LiteRT full int8 (integer-only
  LSTM; needs --litert-python, see benchmarks/litert_convert.py) | tvm_intlstm untuned and tuned
  (8-bit weights: the kernel family the target picks, kernels/isa/: vpdpbusd with VNNI, the exact
  full-range vpmaddwd kernels on AVX2) | tvm_intlstm with 7-bit weights untuned
  and tuned (QuantConfig(weight_bits=7): on AVX2 the u8 x s8 vpmaddubsw kernels, also exact; same model
  quantized with one weight bit less, its accuracy is in the error table). "tuned" = compiled with
  --tuning-logs (both weight routes have records there; a record slower than the hand-written
  kernel when it was tuned is not applied, tuning_logs/README.md).

Configs: 1-layer 256->512 LSTM, T=64 and a 2-layer 650-unit LSTM (word-LM size), T=35, batch 1 and 8.
Time-major float32 input (T, B, I) for every system (LiteRT's Keras model is batch-major: the
transpose is inside its timed call).

How: the parent process builds every artefact once (quantize, compile with threads=True and
export the .so files, ONNX export and quantization, LiteRT conversion) into --workdir, then runs
one worker subprocess per
thread count (TVM's thread pool size is fixed at its first use in a process), with TVM_NUM_THREADS
and OMP_NUM_THREADS set, torch.set_num_threads, ORT intra_op_num_threads and the LiteRT interpreter's
num_threads. Before any timing the worker asserts that every tvm_intlstm output is bit-exact with
the quantized PyTorch model q(x). Each figure: `--repeat` rounds; in each round every system runs
for about `--sample-ms` (several calls, averaged), the systems interleaved in a rotating order so
that load from other processes hits them alike; the tables give the median and the minimum.

Thread pools block instead of spinning (unless --spin): OMP_WAIT_POLICY=PASSIVE for PyTorch's
OpenMP, TVM_THREAD_POOL_SPIN_COUNT=0, ORT session.intra_op.allow_spinning=0 (LiteRT has no such
knob). On a 2-core machine shared with other jobs, with several runtimes' pools in one process,
spin-waiting made 2-thread PyTorch runs 10-100x slower than 1-thread ones (e.g. dyn-int8 256->512
batch 1: ~1 s against 8 ms), which measures the scheduler, not the runtime. One thread is
unaffected (no pool).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CONFIGS = [
    {"name": "lstm256x512", "desc": "1-layer LSTM 256->512", "I": 256, "H": 512, "layers": 1, "T": 64,
     "batches": [1, 8], "seed": 0},
    {"name": "lm650x2", "desc": "2-layer LSTM 650->650 (word LM)", "I": 650, "H": 650, "layers": 2,
     "T": 35, "batches": [1, 8], "seed": 1},
]
SEQ_SWEEP = [8, 16, 32, 64, 128, 256]          # 256->512, batch 1, one thread
SWEEP_PEERS = ["torch_fp32", "ort_qdyn", "tvm_tuned", "tvm_w7", "tvm_w7_tuned"]

PEERS = [
    ("torch_fp32", "PyTorch FP32"),
    ("torch_qdyn", "PyTorch dyn-int8"),
    ("ort_fp32", "ORT FP32"),
    ("ort_qdyn", "ORT dyn-int8"),
    ("litert_int8", "LiteRT int8"),
    ("tvm_untuned", "tvm_intlstm untuned"),
    ("tvm_tuned", "tvm_intlstm tuned"),
    ("tvm_w7", "tvm_intlstm 7-bit weights"),
    ("tvm_w7_tuned", "tvm_intlstm 7-bit tuned"),
]
TVM_KEYS = ("tvm_untuned", "tvm_tuned", "tvm_w7", "tvm_w7_tuned")
LABEL = dict(PEERS)

# The int8 multiply-adds per cycle of one core, by the kernel family the target gets (kernels/isa/):
# (multiply-adds per cycle, how). AVX2: vpmaddwd ymm issues 2 per cycle (two multiply pipes), 16
# int16 products each. VNNI: vpdpbusd, 32 (ymm) / 64 (zmm) u8 x s8 products, counted at 2 per cycle
# (two VNNI-capable pipes on Ice Lake / Sapphire Rapids Xeons and Zen 4 / Zen 5; a core with fewer
# reaches less, so the floor stays a bound). benchmarks/isa_rates.c and vnni_rates.c measure them.
PEAK_MACS = {
    "avx2": (2 * 16, "2 `vpmaddwd` ymm per cycle x 16 int16 multiply-adds"),
    "x86_vnni": (2 * 32, "2 `vpdpbusd` ymm per cycle x 32 u8 x s8 multiply-adds"),
    "avx512_vnni": (2 * 64, "2 `vpdpbusd` zmm per cycle x 64 u8 x s8 multiply-adds"),
    # --kernels amx: the tiles (tdpbssd, 16 x 16 x 64 per 16 cycles = 1024 per cycle on Sapphire
    # Rapids) serve only the input projections; the recurrent steps, most of the time, stay on zmm
    "amx": (2 * 64, "2 `vpdpbusd` zmm per cycle x 64 u8 x s8 multiply-adds (the recurrent steps' "
                    "instruction; the input projections' tdpbssd tiles add up to 1024 per cycle)"),
}


def gops(cfg, T=None, B=1):
    """Operations per call: 2 per multiply-add, T*B*4H*(I_l+H)*2 per layer (one direction)."""
    T = T or cfg["T"]
    tot = 0
    for l in range(cfg["layers"]):
        i_l = cfg["I"] if l == 0 else cfg["H"]
        tot += T * B * 4 * cfg["H"] * (i_l + cfg["H"]) * 2
    return tot / 1e9


def cpu_ghz():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":")[1]) / 1e3
    except OSError:
        pass
    return 2.45


def machine_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------------------------------
# models
def make_model(cfg):
    import torch
    from torch import nn

    class LSTMModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(cfg["I"], cfg["H"], num_layers=cfg["layers"])

        def forward(self, x):
            return self.lstm(x)[0]

    torch.manual_seed(cfg["seed"])
    return LSTMModel().eval()


def make_input(cfg, T, B, salt=0):
    g = np.random.default_rng(1000 * cfg["seed"] + 10 * B + T + salt)
    return g.standard_normal((T, B, cfg["I"]), dtype=np.float32)


def calib_data(cfg):
    g = np.random.default_rng(77 + cfg["seed"])
    return [g.standard_normal((cfg["T"], 8, cfg["I"]), dtype=np.float32) for _ in range(2)]


def torch_qdyn(model):
    import torch
    from torch import nn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {nn.LSTM}, dtype=torch.qint8)


# ---------------------------------------------------------------------------------------------------
# preparation (parent process)
def prepare(a, work, log):
    import torch

    import tvm_intlstm as til

    man = {"configs": {}}
    for cfg in CONFIGS:
        name = cfg["name"]
        d = os.path.join(work, name)
        os.makedirs(d, exist_ok=True)
        ent = {"files": {}, "sizes": {}, "notes": []}
        model = make_model(cfg)
        p = os.path.join(d, "fp32_state_dict.pt")
        torch.save(model.state_dict(), p)
        ent["files"]["fp32"] = p
        ent["sizes"]["fp32_state_dict"] = os.path.getsize(p)
        p = os.path.join(d, "qdyn_state_dict.pt")
        torch.save(torch_qdyn(model).state_dict(), p)
        ent["sizes"]["torch_qdyn_state_dict"] = os.path.getsize(p)

        # tvm_intlstm
        t0 = time.time()
        calib = calib_data(cfg)
        q = til.quantize(model, [torch.from_numpy(c) for c in calib])
        p = os.path.join(d, "model.qpt")
        til.save_quantized(q, p)
        ent["files"]["qpt"] = p
        ent["sizes"]["qpt"] = os.path.getsize(p)
        sd = q.state_dict()
        ent["sizes"]["int8_weight_bytes"] = sum(v.numel() for v in sd.values() if v.dtype == torch.int8)
        ent["sizes"]["int_param_bytes"] = sum(v.numel() * v.element_size() for v in sd.values())
        log(f"[{name}] quantized in {time.time() - t0:.0f} s")
        ex = (torch.from_numpy(make_input(cfg, cfg["T"], 1)),)
        q7 = til.quantize(model, [torch.from_numpy(c) for c in calib], til.QuantConfig(weight_bits=7))
        p = os.path.join(d, "model_w7.qpt")
        til.save_quantized(q7, p)
        ent["files"]["qpt_w7"] = p
        for kind, logs, qm in (("untuned", None, q), ("tuned", a.tuning_logs, q), ("w7", None, q7),
                               ("w7_tuned", a.tuning_logs, q7)):
            t0 = time.time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                # threads=True: the worker for each thread count runs the same .so (the
                # thread-pool kernels; with one worker they run as the serial ones, ~0.97x)
                cm = til.compile(qm, target=a.target, example_inputs=ex, tuning_logs=logs, verbose=False,
                                 threads=True, kernels=a.kernels)
            p = cm.export_library(os.path.join(d, f"tvm_{kind}.so"))
            ent["files"][f"tvm_{kind}"] = p
            ent["sizes"][f"tvm_{kind}_so"] = os.path.getsize(p)
            log(f"[{name}] compiled tvm_intlstm {kind} in {time.time() - t0:.0f} s")

        # ONNX
        t0 = time.time()
        p = os.path.join(d, "fp32.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, ex, p, dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "T", 1: "B"}, "y": {0: "T", 1: "B"}},
                              opset_version=17)
        ent["files"]["onnx_fp32"] = p
        ent["sizes"]["onnx_fp32"] = os.path.getsize(p)
        import logging

        from onnxruntime.quantization import QuantType, quantize_dynamic

        logging.getLogger().setLevel(logging.ERROR)
        pq = os.path.join(d, "int8_dynamic.onnx")
        quantize_dynamic(p, pq, weight_type=QuantType.QInt8)
        import onnx

        ops = sorted({n.op_type for n in onnx.load(pq).graph.node})
        assert "DynamicQuantizeLSTM" in ops, ops
        ent["files"]["onnx_qdyn"] = pq
        ent["sizes"]["onnx_qdyn"] = os.path.getsize(pq)
        log(f"[{name}] ONNX export + quantize_dynamic in {time.time() - t0:.0f} s")

        # LiteRT
        if a.litert_python:
            t0 = time.time()
            w = {}
            for l in range(cfg["layers"]):
                w[f"w_ih{l}"] = getattr(model.lstm, f"weight_ih_l{l}").detach().numpy()
                w[f"w_hh{l}"] = getattr(model.lstm, f"weight_hh_l{l}").detach().numpy()
                w[f"b{l}"] = (getattr(model.lstm, f"bias_ih_l{l}")
                              + getattr(model.lstm, f"bias_hh_l{l}")).detach().numpy()
            pw, pc = os.path.join(d, "weights.npz"), os.path.join(d, "calib.npy")
            np.savez(pw, **w)
            np.save(pc, np.concatenate([c.transpose(1, 0, 2) for c in calib]))
            out = os.path.join(d, "litert_int8_b{batch}.tflite")
            cmd = [a.litert_python, os.path.join(HERE, "litert_convert.py"), pw, pc, out]
            for B in cfg["batches"]:
                cmd += ["--batch", str(B)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                ent["notes"].append("LiteRT conversion failed: " + r.stderr.strip().splitlines()[-1])
                log(f"[{name}] LiteRT conversion failed:\n{r.stderr[-3000:]}")
            else:
                for B in cfg["batches"]:
                    pb = out.replace("{batch}", str(B))
                    ent["files"][f"litert_b{B}"] = pb
                ent["sizes"]["litert_int8"] = os.path.getsize(out.replace("{batch}", str(cfg["batches"][0])))
                log(f"[{name}] LiteRT full-int8 conversion in {time.time() - t0:.0f} s")
        man["configs"][name] = ent
    return man


# ---------------------------------------------------------------------------------------------------
# worker (one subprocess per thread count)
class Peers:
    """The callables of every system for one model config."""

    def __init__(self, cfg, ent, threads, a):
        import onnxruntime as ort
        import torch

        import tvm_intlstm as til

        self.cfg = cfg
        self.model = make_model(cfg)
        self.model.load_state_dict(torch.load(ent["files"]["fp32"], weights_only=True))
        self.qdyn = torch_qdyn(self.model)
        self.q = til.load_quantized(ent["files"]["qpt"])
        q7 = til.load_quantized(ent["files"]["qpt_w7"])
        self.qs = {"tvm_untuned": self.q, "tvm_tuned": self.q, "tvm_w7": q7, "tvm_w7_tuned": q7}
        self.cms = {k: til.load(ent["files"][k]) for k in TVM_KEYS}
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        if not a.spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.ort = {k: ort.InferenceSession(ent["files"][f], so, providers=["CPUExecutionProvider"])
                    for k, f in (("ort_fp32", "onnx_fp32"), ("ort_qdyn", "onnx_qdyn"))}
        self.litert = {}
        if any(k.startswith("litert_b") for k in ent["files"]):
            try:
                from ai_edge_litert.interpreter import Interpreter
            except ImportError as e:
                ent["notes"].append(f"LiteRT not run: {e}")
            else:
                for B in cfg["batches"]:
                    it = Interpreter(model_path=ent["files"][f"litert_b{B}"], num_threads=threads)
                    it.allocate_tensors()
                    self.litert[B] = (it, it.get_input_details()[0]["index"],
                                      it.get_output_details()[0]["index"])

    def available(self, B):
        return [k for k, _ in PEERS if k != "litert_int8" or B in self.litert]

    def fn(self, key, x):
        """A zero-argument callable running system `key` on the time-major float32 array x,
        returning its output as float32 (T, B, H) or the integer tvm_intlstm output."""
        import torch

        xt = torch.from_numpy(x)
        if key == "torch_fp32":
            return lambda: self.model(xt)
        if key == "torch_qdyn":
            return lambda: self.qdyn(xt)
        if key in self.ort:
            s = self.ort[key]
            return lambda: s.run(None, {"x": x})[0]
        if key == "litert_int8":
            it, i_in, i_out = self.litert[x.shape[1]]

            def run():
                it.reset_all_variables()   # the LSTM state tensors persist across invokes: zero them
                it.set_tensor(i_in, np.ascontiguousarray(x.transpose(1, 0, 2)))
                it.invoke()
                return it.get_tensor(i_out).transpose(1, 0, 2)
            return run
        cm = self.cms[key]
        return lambda: cm(x)

    def as_float(self, key, y):
        import torch

        if key.startswith("tvm_"):
            return self.qs[key].dequantize(torch.from_numpy(y)).numpy()
        return y.numpy() if hasattr(y, "numpy") else np.asarray(y)


def check_bit_exact(p, x):
    import torch

    for k, cm in p.cms.items():
        ref = p.qs[k](torch.from_numpy(x)).numpy()
        y = cm(x)
        assert y.dtype == ref.dtype and np.array_equal(y, ref), \
            f"{k} output differs from q(x) for {p.cfg['name']} input {x.shape}"


def time_interleaved(fns, repeat, sample_s):
    """fns: {key: callable}. Returns {key: [seconds per call, one per round]}."""
    number = {}
    for k, f in fns.items():
        f()
        f()
        t = time.perf_counter()
        f()
        dt = time.perf_counter() - t
        number[k] = max(1, min(200, int(round(sample_s / max(dt, 1e-6)))))
    keys = list(fns)
    samples = {k: [] for k in keys}
    gc.collect()
    gc.disable()
    try:
        for r in range(repeat):
            order = keys[r % len(keys):] + keys[:r % len(keys)]
            for k in order:
                f, n = fns[k], number[k]
                t = time.perf_counter()
                for _ in range(n):
                    f()
                samples[k].append((time.perf_counter() - t) / n)
    finally:
        gc.enable()
    return samples


def worker(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    import torch

    threads = spec["threads"]
    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    a = argparse.Namespace(**spec["args"])
    man = spec["manifest"]
    res = {"threads": threads, "runs": [], "sweep": [], "accuracy": [], "exact_checked": 0,
           "notes": []}
    t_start = time.time()
    for cfg in CONFIGS:
        ent = man["configs"][cfg["name"]]
        p = Peers(cfg, ent, threads, a)
        res["notes"] += ent["notes"]
        inputs = {B: make_input(cfg, cfg["T"], B) for B in cfg["batches"]}
        for B, x in inputs.items():          # bit-exactness first, before any timing
            check_bit_exact(p, x)
            res["exact_checked"] += len(p.cms)
        for B, x in inputs.items():
            keys = p.available(B)
            if threads == spec["accuracy_threads"]:
                ref = p.model(torch.from_numpy(x)).numpy()
                for k in keys:
                    y = p.as_float(k, p.fn(k, x)())
                    err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
                    res["accuracy"].append({"config": cfg["name"], "B": B, "peer": k, "rel_err": err})
            s = time_interleaved({k: p.fn(k, x) for k in keys}, a.repeat, a.sample_ms / 1e3)
            for k, v in s.items():
                res["runs"].append({"config": cfg["name"], "B": B, "T": cfg["T"], "peer": k,
                                    "median": statistics.median(v), "min": min(v), "n": len(v),
                                    "rounds": v})
            print(f"[threads={threads}] {cfg['name']} B={B}: " + ", ".join(
                f"{k} {statistics.median(v) * 1e3:.2f}" for k, v in s.items()) + " ms", flush=True)
        if cfg["name"] == "lstm256x512" and threads == spec["sweep_threads"]:
            for T in SEQ_SWEEP:
                x = make_input(cfg, T, 1, salt=5)
                check_bit_exact(p, x)
                res["exact_checked"] += len(p.cms)
                s = time_interleaved({k: p.fn(k, x) for k in SWEEP_PEERS}, a.sweep_repeat,
                                     a.sample_ms / 1e3)
                for k, v in s.items():
                    res["sweep"].append({"T": T, "peer": k, "median": statistics.median(v),
                                         "min": min(v)})
                print(f"[threads={threads}] sweep T={T}: " + ", ".join(
                    f"{k} {statistics.median(v) * 1e3:.2f}" for k, v in s.items()) + " ms", flush=True)
        del p
        gc.collect()
    res["seconds"] = time.time() - t_start
    with open(spec["out"], "w") as f:
        json.dump(res, f)


# ---------------------------------------------------------------------------------------------------
# report
def fmt_ms(r):
    return f"{r['median'] * 1e3:.2f} ({r['min'] * 1e3:.2f})"


def fmt_bytes(n):
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def rel(path):
    return os.path.relpath(path, ROOT) if path and os.path.isabs(path) and path.startswith(ROOT) else path


def versions():
    import importlib.metadata as md

    out = []
    for pkg in ("torch", "apache-tvm", "onnx", "onnxruntime", "ai-edge-litert"):
        try:
            out.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            out.append(f"{pkg} (not installed)")
    return ", ".join(out)


def render(a, man, results, command, ghz, wall, tf_version):
    L = []
    L.append(f"Command: `{command}`  ")
    L.append(f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: "
             f"{machine_name()} (lscpu model name), {os.cpu_count()} cores, Linux {platform.release()}; "
             f"shared with other jobs (load average at start {a.load_start}); wall time {wall:.0f} s.  ")
    L.append(f"Packages: {versions()}"
             + (f"; LiteRT models converted with TensorFlow {tf_version} + tf-keras" if tf_version else "")
             + f". tvm_intlstm target `{a.target}`, tuning logs `{rel(a.tuning_logs)}`.")
    L.append("")
    L.append(f"Latency per call in ms: median of {a.repeat} interleaved rounds (minimum in "
             "parentheses). Float32 input (T, B, I) in, each system's own output out. Thread pools "
             + ("spin-wait (runtime defaults)." if a.spin else "block instead of spin-waiting "
                "(OMP_WAIT_POLICY=PASSIVE, TVM_THREAD_POOL_SPIN_COUNT=0, ORT allow_spinning=0)."))
    L.append("")
    keys = [k for k, _ in PEERS]
    L.append("| threads | model | T | B | " + " | ".join(LABEL[k] for k in keys) + " |")
    L.append("|---:|---|---:|---:|" + "---:|" * len(keys))
    rows = []
    for res in results:
        for cfg in CONFIGS:
            for B in cfg["batches"]:
                rr = {r["peer"]: r for r in res["runs"] if r["config"] == cfg["name"] and r["B"] == B}
                rows.append((res["threads"], cfg, B, rr))
                L.append(f"| {res['threads']} | {cfg['desc']} | {cfg['T']} | {B} | "
                         + " | ".join(fmt_ms(rr[k]) if k in rr else "n/a" for k in keys) + " |")
    L.append("")
    L.append("Speed-up of tvm_intlstm over each system: that system's median / tvm_intlstm's median "
             "(> 1: tvm_intlstm is faster), as tuned / untuned / 7-bit / 7-bit tuned.")
    L.append("")
    others = [k for k in keys if not k.startswith("tvm_")]
    L.append("| threads | model | B | " + " | ".join(f"vs {LABEL[k]}" for k in others)
             + " | tuned vs untuned |")
    L.append("|---:|---|---:|" + "---:|" * (len(others) + 1))
    for th, cfg, B, rr in rows:
        cells = []
        for k in others:
            if k not in rr:
                cells.append("n/a")
                continue
            cells.append(" / ".join(f"{rr[k]['median'] / rr[t]['median']:.2f}"
                                    for t in ("tvm_tuned", "tvm_untuned", "tvm_w7", "tvm_w7_tuned")))
        cells.append(f"{rr['tvm_untuned']['median'] / rr['tvm_tuned']['median']:.2f}")
        L.append(f"| {th} | {cfg['name']} | {B} | " + " | ".join(cells) + " |")
    L.append("")
    L.append("tvm_intlstm against ORT dyn-int8 round by round: in each round the systems run back to "
             "back (a few ms apart), so the ratio of the two times in one round cancels the load "
             "drift of a shared machine that the medians above carry. Median over the rounds of "
             "tvm_intlstm's time / ORT's time (< 1: tvm_intlstm faster), and in how many rounds "
             "tvm_intlstm was faster.")
    L.append("")
    L.append("| threads | model | B | untuned / ORT | tuned / ORT | 7-bit / ORT | 7-bit tuned / ORT |")
    L.append("|---:|---|---:|---:|---:|---:|---:|")
    for th, cfg, B, rr in rows:
        if "ort_qdyn" not in rr or "rounds" not in rr["ort_qdyn"]:
            continue
        cells = []
        for k in TVM_KEYS:
            q = [t / o for t, o in zip(rr[k]["rounds"], rr["ort_qdyn"]["rounds"])]
            cells.append(f"{statistics.median(q):.2f} ({sum(x < 1 for x in q)}/{len(q)})")
        L.append(f"| {th} | {cfg['name']} | {B} | " + " | ".join(cells) + " |")
    L.append("")
    from tvm_intlstm.kernels import isa as families
    from tvm_intlstm.target import parse_target
    with families.prefer(a.kernels):
        fam = families.pick(parse_target(a.target)).name
    macs, how = PEAK_MACS.get(fam, PEAK_MACS["avx2"])
    peak1 = macs * ghz * 2     # GOP/s per core
    L.append("Achieved int8 throughput of tvm_intlstm tuned, counting 2 operations per multiply-add: "
             "GOP per call = sum over layers of T x B x 4H x (I_l + H) x 2. Physical floor: the "
             f"target `{a.target}` gets the `{fam}` kernel family (docs/compiler.md); one core issues "
             f"{how} = {macs} int8 multiply-adds per cycle; at the "
             f"{ghz:.2f} GHz that /proc/cpuinfo reports, {macs} x {ghz:.2f} GHz x 2 = "
             f"**{peak1:.0f} GOP/s per core** (x threads for the floor below). A virtual machine's "
             "/proc/cpuinfo may report the base clock: boost clocks raise the real peak, and a % "
             "above 100 means the core ran faster than that clock (`benchmarks/vnni_rates.c` / "
             "`isa_rates.c` measure the instruction's rate at the clock the core actually runs; "
             "BENCHMARKS.md's reading per CPU compares with it). The u8 / int16 conversions, "
             "accumulation adds and the sequential recurrent step are extra work on top.")
    L.append("")
    L.append("| threads | model | B | GOP per call | floor (ms) | tvm tuned median GOP/s | best-round GOP/s "
             "| % of peak (median) | tvm untuned GOP/s | tvm 7-bit GOP/s | 7-bit % of peak "
             "| tvm 7-bit tuned GOP/s | 7-bit tuned % of peak |")
    L.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for th, cfg, B, rr in rows:
        g = gops(cfg, B=B)
        peak = peak1 * th
        tt, tu, t7, t7t = rr["tvm_tuned"], rr["tvm_untuned"], rr["tvm_w7"], rr["tvm_w7_tuned"]
        L.append(f"| {th} | {cfg['name']} | {B} | {g:.3f} | {g / peak * 1e3:.3f} | "
                 f"{g / tt['median']:.1f} | {g / tt['min']:.1f} | {100 * g / tt['median'] / peak:.0f}% | "
                 f"{g / tu['median']:.1f} | {g / t7['median']:.1f} | {100 * g / t7['median'] / peak:.0f}% | "
                 f"{g / t7t['median']:.1f} | {100 * g / t7t['median'] / peak:.0f}% |")
    L.append("")
    L.append("Model files (same weights). tvm_intlstm: the exported `.so` (weights inside) and the "
             "int8 weight bytes of the quantized model (plus its int32 bias/requantization constants "
             "and PWL tables: 'all int params').")
    L.append("")
    cols = [("fp32_state_dict", "FP32 state dict"), ("torch_qdyn_state_dict", "PyTorch dyn-int8 state dict"),
            ("onnx_fp32", "ONNX FP32"), ("onnx_qdyn", "ONNX dyn-int8"), ("litert_int8", "LiteRT int8 .tflite"),
            ("tvm_untuned_so", "tvm .so untuned"), ("tvm_tuned_so", "tvm .so tuned"),
            ("tvm_w7_so", "tvm .so 7-bit"), ("tvm_w7_tuned_so", "tvm .so 7-bit tuned"),
            ("int8_weight_bytes", "tvm int8 weights"), ("int_param_bytes", "tvm all int params")]
    L.append("| model | " + " | ".join(c for _, c in cols) + " | .so tuned / FP32 |")
    L.append("|---|" + "---:|" * (len(cols) + 1))
    for cfg in CONFIGS:
        s = man["configs"][cfg["name"]]["sizes"]
        L.append(f"| {cfg['name']} | " + " | ".join(fmt_bytes(s[k]) if k in s else "n/a" for k, _ in cols)
                 + f" | {s['tvm_tuned_so'] / s['fp32_state_dict']:.2f} |")
    acc = [r for res in results for r in res["accuracy"]]
    if acc:
        L.append("")
        L.append("Output error against PyTorch FP32 (relative L2 over the whole output sequence, "
                 "batch 1; tvm_intlstm's int8 output dequantized with its output scale):")
        L.append("")
        L.append("| model | " + " | ".join(LABEL[k] for k in keys) + " |")
        L.append("|---|" + "---:|" * len(keys))
        for cfg in CONFIGS:
            rr = {r["peer"]: r["rel_err"] for r in acc if r["config"] == cfg["name"] and r["B"] == 1}
            L.append(f"| {cfg['name']} | " + " | ".join(f"{rr[k]:.2g}" if k in rr else "n/a"
                                                      for k in keys) + " |")
    sweep = [r for res in results for r in res["sweep"]]
    if sweep:
        L.append("")
        L.append(f"Latency against sequence length, 256->512 LSTM, batch 1, {a.sweep_threads} thread(s), "
                 f"ms, median of {a.sweep_repeat} interleaved rounds (min); plot: `{rel(a.plot)}`.")
        L.append("")
        L.append("| T | " + " | ".join(LABEL[k] for k in SWEEP_PEERS) + " | tvm tuned vs PyTorch FP32 "
                 "| tvm tuned vs ORT dyn-int8 | tvm 7-bit vs ORT dyn-int8 | tvm 7-bit tuned vs ORT dyn-int8 |")
        L.append("|---:|" + "---:|" * (len(SWEEP_PEERS) + 4))
        for T in SEQ_SWEEP:
            rr = {r["peer"]: r for r in sweep if r["T"] == T}
            L.append(f"| {T} | " + " | ".join(fmt_ms(rr[k]) for k in SWEEP_PEERS)
                     + f" | {rr['torch_fp32']['median'] / rr['tvm_tuned']['median']:.2f}"
                     + f" | {rr['ort_qdyn']['median'] / rr['tvm_tuned']['median']:.2f}"
                     + f" | {rr['ort_qdyn']['median'] / rr['tvm_w7']['median']:.2f}"
                     + f" | {rr['ort_qdyn']['median'] / rr['tvm_w7_tuned']['median']:.2f} |")
    n_exact = sum(res["exact_checked"] for res in results)
    notes = sorted({n for res in results for n in res["notes"]})
    L.append("")
    L.append(f"Bit-exactness: {n_exact} tvm_intlstm outputs (every input timed, every module, every "
             "thread count) asserted equal to their quantized model's q(x) before timing.")
    for n in notes:
        L.append(f"Note: {n}")
    for r in acc:
        if r["B"] == 1 and r["rel_err"] > 0.5:
            L.append(f"Note: {LABEL[r['peer']]}'s output on {r['config']} is wrong (relative error "
                     f"{r['rel_err']:.2g}); its latency is still that of the same operations.")
    if not a.litert_python:
        L.append("Note: LiteRT not run (no --litert-python with TensorFlow + tf-keras for the converter).")
    return "\n".join(L) + "\n"


ANCHOR = "<!-- peers.py: new CPU-class sections go after this line -->"


def markers(family: str) -> tuple[str, str]:
    """The BENCHMARKS.md markers of one CPU class's generated tables (one section per kernel
    family, so that a run on a VNNI machine does not overwrite the AVX2 machine's tables)."""
    return (f"<!-- peers.py:begin (generated, {family} kernels) -->",
            f"<!-- peers.py:end ({family} kernels) -->")


def write_md(path, block, family, title):
    begin, end = markers(family)
    text = ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    new = f"{begin}\n{block}{end}"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        post = rest.split(end, 1)[1]
        text = pre + new + post
    elif ANCHOR in text:     # a new CPU class: its section goes first, after the anchor
        pre, post = text.split(ANCHOR, 1)
        text = pre + ANCHOR + f"\n\n### {title}\n\n{new}\n" + post
    else:
        text = ("# Benchmarks\n\n## tvm_intlstm against its peers (`benchmarks/peers.py`)\n\n"
                + f"### {title}\n\n" + new + "\n" + text)
    with open(path, "w") as f:
        f.write(text)


def plot(path, results, threads):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [r for res in results for r in res["sweep"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for k, m in zip(SWEEP_PEERS, "osD^v"):
        pts = sorted((r["T"], r["median"] * 1e3, r["min"] * 1e3) for r in sweep if r["peer"] == k)
        T = [p[0] for p in pts]
        ax.plot(T, [p[1] for p in pts], marker=m, label=LABEL[k] + " (median)")
        ax.fill_between(T, [p[2] for p in pts], [p[1] for p in pts], alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(SEQ_SWEEP)
    ax.set_xticklabels([str(t) for t in SEQ_SWEEP])
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("latency per call (ms)")
    ax.set_title(f"LSTM 256->512, batch 1, {threads} thread(s); band: min..median")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)


def _host_tuning_logs():
    from tvm.target import codegen  # pylint: disable=import-outside-toplevel
    d = os.path.join(ROOT, "tuning_logs", str(codegen.llvm_get_system_cpu()))
    return d if os.path.isdir(d) else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--repeat", type=int, default=15, help="interleaved rounds per config")
    ap.add_argument("--sweep-repeat", type=int, default=9, help="rounds per sequence length")
    ap.add_argument("--sample-ms", type=float, default=20.0, help="target time of one sample")
    # the host and its CPU's committed tuning logs (none for a CPU without a directory there)
    ap.add_argument("--target", default="host")
    ap.add_argument("--kernels", default=None,
                    help="kernel family for tvm_intlstm (compile(kernels=...)), e.g. amx (opt-in "
                         "AMX tiles for the input projections); default: the target's pick")
    ap.add_argument("--tuning-logs", default=_host_tuning_logs())
    ap.add_argument("--litert-python", default=os.environ.get("PEERS_LITERT_PYTHON"),
                    help="a Python with tensorflow + tf-keras, for benchmarks/litert_convert.py")
    ap.add_argument("--workdir", default=None, help="artefacts (default: a temporary directory)")
    ap.add_argument("--md", default=os.path.join(ROOT, "BENCHMARKS.md"),
                    help="write the tables into this file between the peers.py markers ('' = no)")
    ap.add_argument("--plot", default=os.path.join(ROOT, "docs", "latency_vs_seq.png"))
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--spin", action="store_true",
                    help="keep the runtimes' default spin-waiting thread pools (default: make them "
                         "block: OMP_WAIT_POLICY=PASSIVE, TVM_THREAD_POOL_SPIN_COUNT=0, ORT "
                         "session.intra_op.allow_spinning=0; see the module doc)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker)

    t_start = time.time()
    a.load_start = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    command = " ".join(shlex.quote(x) for x in [os.path.relpath(sys.executable, ROOT)
                                                if sys.executable.startswith(ROOT) else sys.executable,
                                                os.path.relpath(os.path.abspath(__file__), ROOT)]
                       + sys.argv[1:])
    threads = [int(t) for t in a.threads.split(",")]

    def log(msg):
        print(msg, flush=True)

    tf_version = None
    if a.litert_python:
        r = subprocess.run([a.litert_python, "-c", "import importlib.metadata as m; "
                            "print(m.version('tensorflow'))"], capture_output=True, text=True)
        tf_version = r.stdout.strip() or None
    work = a.workdir or tempfile.mkdtemp(prefix="tvm_intlstm_peers_")
    man = prepare(a, work, log)
    log(f"prepared in {time.time() - t_start:.0f} s ({work})")
    results = []
    args = {k: v for k, v in vars(a).items() if k != "worker"}
    for th in threads:
        spec = {"threads": th, "manifest": man, "args": args, "out": os.path.join(work, f"res_t{th}.json"),
                "sweep_threads": threads[0], "accuracy_threads": threads[0]}
        sp = os.path.join(work, f"spec_t{th}.json")
        with open(sp, "w") as f:
            json.dump(spec, f)
        env = dict(os.environ, TVM_NUM_THREADS=str(th), OMP_NUM_THREADS=str(th))
        if not a.spin:
            env.update(OMP_WAIT_POLICY="PASSIVE", TVM_THREAD_POOL_SPIN_COUNT="0")
        subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", sp], env=env, check=True)
        with open(spec["out"]) as f:
            results.append(json.load(f))
        man = spec["manifest"]
    a.sweep_threads = threads[0]
    wall = time.time() - t_start
    block = render(a, man, results, command, cpu_ghz(), wall, tf_version)
    print(block)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"manifest": man, "results": results}, f, indent=1)
    if a.md:
        from tvm_intlstm.kernels import isa as families
        from tvm_intlstm.target import parse_target
        with families.prefer(a.kernels):
            fam = families.pick(parse_target(a.target)).name
        from tvm.target import codegen
        write_md(a.md, block, fam, f"{machine_name()} ({codegen.llvm_get_system_cpu()}): {fam} kernels")
        log(f"wrote {a.md}")
    if a.plot and any(res["sweep"] for res in results):
        plot(a.plot, results, threads[0])
        log(f"wrote {a.plot}")


if __name__ == "__main__":
    sys.exit(main())
