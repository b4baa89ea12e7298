"""tvm_intlstm.compile: quantized PyTorch model -> integer-only TVM module (CompiledModule)."""
from __future__ import annotations

import os
import threading
import time
from typing import Sequence

import numpy as np
import torch
import tvm
from tvm import relax

from .frontend.importer import import_quantized
from .passes import integer_pipeline
from .runtime.inputs import check_inputs
from .quant.graph import QuantizedModel, info_from_data, info_to_data


def _log(msg, verbose):
    if verbose:
        print(f"[tvm_intlstm] {msg}", flush=True)


def _target(spec):
    from .target import parse_target
    return parse_target(spec)


class CompiledModule:
    """A compiled integer-only model. Call it on numpy arrays or torch tensors (float32 features or
    int64 token ids, as the quantized model takes); it returns numpy integer arrays (int32 logits
    from a final linear layer). Thread-safe: calls are serialized by a lock (one Relax VM)."""

    def __init__(self, executable, target, input_kinds, output_info, ir_module=None, vocab_sizes=None,
                 input_shapes=None, state_formats=None, state_batch_of=None, amx: bool = False,
                 entry: str = "main", input_scales=None):
        self.executable = executable
        # the Relax function a call runs: "main", or one function of a library holding several
        # (issue 18: a seq2seq library's "encode" / "decode_step", tvm_intlstm/seq2seq.py)
        self.entry = entry
        # {input index: scale} of int8 activation inputs (kind "act"), as QuantizedModel.input_scales
        self.input_scales = {int(k): float(v) for k, v in (input_scales or {}).items()}
        self._state_formats = list(state_formats or [])  # quant.stateful.StateFormat per state input
        # (input index, axis) of the data input whose batch the states' dim 1 must equal, or None
        self.state_batch_of = tuple(state_batch_of) if state_batch_of else None
        # has AMX tile kernels (compile(..., kernels="amx")): the process must get the OS's AMX
        # permission before the first call (runtime.amx), else the first tile instruction is SIGILL
        self.amx = bool(amx)
        # per input: list of dims, an int for a static dim, None for a symbolic (batch/time) dim
        self.input_shapes = input_shapes
        self.target = target
        self.input_kinds = list(input_kinds)
        self.output_info = output_info
        self.ir_module = ir_module
        self.vocab_sizes = vocab_sizes or {}
        self._vm = None  # created on first call: a cross-compiled module cannot run here
        self._lock = threading.Lock()

    def _get_vm(self):
        if self._vm is None:
            import platform
            from .target import target_features
            arch = target_features(self.target).arch
            host = "aarch64" if platform.machine() in ("aarch64", "arm64") else platform.machine()
            if arch != host:
                raise RuntimeError(
                    f"compiled for {arch} ({self.target}); it cannot run on this {host} machine: export it "
                    "(cm.export_library) and run it on the board, under emulation (tvm-intlstm run --emulate "
                    "aarch64 / tvm_intlstm.runtime.emulate.run_emulated) or over RPC (tvm_intlstm.runtime.rpc.run_remote)")
            from .target import check_runs_on_host
            check_runs_on_host(self.target, "this module")
            if self.amx:   # once per process; AMXUnavailableError (clear) where the OS refuses
                from .runtime.amx import request_amx_permission
                request_amx_permission()
            self._vm = relax.VirtualMachine(self.executable, tvm.cpu())
        return self._vm

    @property
    def output_scales(self):
        from .quant.graph import _tree_map_info
        return _tree_map_info(self.output_info, lambda i: i.scale)

    # LSTM states (docs/stateful.md): the same helpers as QuantizedModel's ----------------------
    def state_formats(self) -> list:
        return list(self._state_formats)

    def zero_state(self, batch: int) -> tuple:
        """Zero integer states (numpy) for every state input, in input order."""
        return tuple(f.zeros(batch).numpy() for f in self._state_formats)

    def quantize_state(self, *states) -> tuple:
        from .quant.state_format import convert_states
        return tuple(s.numpy() for s in convert_states(self._state_formats, states, "quantize"))

    def dequantize_state(self, *states) -> tuple:
        from .quant.state_format import convert_states
        return tuple(s.numpy() for s in convert_states(self._state_formats, states, "dequantize"))

    def __call__(self, *inputs):
        arrays = check_inputs(inputs, self.input_kinds, self.input_shapes, self.vocab_sizes)
        if self._state_formats:
            _check_state_batches(arrays, self._state_formats, self.state_batch_of)
        args = [_to_tvm(a) for a in arrays]
        with self._lock:
            out = self._get_vm()[self.entry](*args)
        return _to_numpy(out)

    def export_library(self, path: str | os.PathLike) -> str:
        from .target import export_library
        path = os.fspath(path)
        export_library(self.executable, path, self.target)
        _write_meta(path, self)
        return path


def _check_state_batches(arrays, formats, batch_of) -> None:
    """State inputs [L*D, B, H] have the data input's batch size B (the VM would only say
    "match_cast error"; this names the inputs)."""
    from .quant.state_format import StateError
    for f in formats:
        f.check(arrays[f.input_index], f"input {f.input_index}:")
    batches = {int(arrays[f.input_index].shape[1]) for f in formats}
    if batch_of is not None:
        i, axis = batch_of
        want = int(arrays[i].shape[axis])
        if batches != {want}:
            raise StateError(f"the LSTM states have batch size {sorted(batches)} (their dim 1) but input {i} "
                             f"has batch size {want} (its dim {axis}): give states of batch {want}")
    elif len(batches) > 1:
        raise StateError(f"the LSTM state inputs have different batch sizes {sorted(batches)}")


def _state_batch_of(func, formats):
    """(input index, axis) of a data input dim that is the same symbolic size as the states' batch
    (torch.export equated them), or None."""
    if not formats:
        return None
    params = list(func.params)
    var = params[formats[0].input_index].ty.shape.values[1]
    state_idx = {f.input_index for f in formats}
    for i, p in enumerate(params):
        if i in state_idx:
            continue
        for axis, d in enumerate(p.ty.shape.values):
            if d.same_as(var):
                return (i, axis)
    return None


def _aligned_copy(a: np.ndarray) -> np.ndarray:
    """A C-contiguous, writeable copy of `a` starting on a 64-byte boundary (what DLPack import
    into TVM requires)."""
    buf = np.empty(a.nbytes + 64, np.uint8)
    start = (-buf.ctypes.data) % 64
    out = buf[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    np.copyto(out, a)
    return out


def _to_tvm(a: np.ndarray):
    """A TVM tensor over the array's memory, without a copy when DLPack allows it (C-contiguous,
    writeable, 64-byte aligned); else over an aligned numpy copy. (tvm.runtime.tensor copies at
    ~1 GB/s: 70 us for a 256-wide T=64 input, 4 % of a batch-1 call; numpy's copy is ~10x faster.
    numpy aligns large arrays to 16 bytes only, so both paths are common.) The kernels only read
    their inputs."""
    if not (a.flags.c_contiguous and a.flags.writeable and a.ctypes.data % 64 == 0):
        a = _aligned_copy(a)
    try:
        return tvm.runtime.from_dlpack(a)
    except Exception:  # noqa: BLE001 - a DLPack refusal we did not foresee: TVM's own copy
        return tvm.runtime.tensor(a)


def _to_numpy(out):
    """numpy views of the VM's output tensors (no copy; the view keeps the tensor, whose storage
    the VM does not reuse while it is referenced)."""
    if isinstance(out, tvm.runtime.Tensor):
        return np.from_dlpack(out)
    if hasattr(out, "__len__") and not hasattr(out, "numpy"):
        return tuple(_to_numpy(o) for o in out)
    return out.numpy()


def module_meta(cm) -> dict:
    """The .so.json description of one compiled function (a seq2seq library has one per function)."""
    from .target import target_to_dict
    return {"format": "tvm_intlstm-1", "input_kinds": cm.input_kinds, "target": target_to_dict(cm.target),
            "input_shapes": cm.input_shapes, "amx": cm.amx,
            "output_info": info_to_data(cm.output_info), "vocab_sizes": {str(k): v for k, v in cm.vocab_sizes.items()},
            "state_formats": [f.to_data() for f in cm._state_formats], "state_batch_of": cm.state_batch_of,
            "input_scales": {str(k): v for k, v in cm.input_scales.items()}}


def _write_meta(path, cm):
    import json
    meta = module_meta(cm)
    with open(path + ".json", "w") as f:
        json.dump(meta, f, indent=1)


def check_elf_library(path: str) -> None:
    """Refuse a file that is not a complete ELF64 shared library before the dynamic loader maps it:
    a truncated .so (a copy cut short) makes dlopen map pages past the end of the file, and the
    first touch of them kills the process with SIGBUS. Checks the header, the program headers'
    PT_LOAD segments and the section header table against the file size."""
    import struct
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF":
            raise ValueError(f"{path} is not a loadable TVM module (not an ELF shared library)")
        if head[4] != 2 or head[5] not in (1, 2):
            raise ValueError(f"{path} is not a loadable TVM module (not a 64-bit ELF file)")
        end = "<" if head[5] == 1 else ">"
        phoff, shoff = struct.unpack_from(end + "QQ", head, 0x20)
        phentsize, phnum, shentsize, shnum = struct.unpack_from(end + "HHHH", head, 0x36)
        problems = []
        if phoff + phnum * phentsize > size:
            problems.append(f"program headers end at byte {phoff + phnum * phentsize}")
        elif phentsize >= 56:
            f.seek(phoff)
            table = f.read(phnum * phentsize)
            for i in range(phnum):
                ptype, _, poff, _, _, pfilesz = struct.unpack_from(end + "IIQQQQ", table, i * phentsize)
                if ptype == 1 and poff + pfilesz > size:  # PT_LOAD
                    problems.append(f"loadable segment {i} ends at byte {poff + pfilesz}")
                    break
        if shnum and shoff + shnum * shentsize > size:
            problems.append(f"section header table ends at byte {shoff + shnum * shentsize}")
    if problems:
        raise ValueError(f"{path} is truncated or corrupt: {'; '.join(problems)}, but the file has "
                         f"{size} bytes (copy the .so again)")


def load(path: str | os.PathLike) -> CompiledModule:
    """Load an exported module (and its .json metadata). The .so is native code: load only files from
    a trusted source."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no compiled module at {path}")
    meta_path = path + ".json"
    if not os.path.isfile(meta_path):
        raise ValueError(f"{path} has no metadata file {meta_path}: export it with CompiledModule.export_library")
    from .runtime.inputs import read_meta
    meta = read_meta(path)
    if isinstance(meta, dict) and meta.get("format") == "tvm_intlstm-seq2seq-1":   # issue 18
        # (tvm_intlstm.load dispatches such a file to seq2seq.load_seq2seq; this module does not
        # import seq2seq, which imports it)
        raise ValueError(f"{path} is an encoder-decoder library (encode + decode_step): open it with "
                         "tvm_intlstm.load or tvm_intlstm.load_seq2seq")
    if not isinstance(meta, dict) or meta.get("format") != "tvm_intlstm-1":
        raise ValueError(f"{meta_path} is not a tvm_intlstm module description")
    target = _target(meta["target"])
    ex = load_executable(path, target)
    return module_from_meta(ex, target, meta)


def load_executable(path: str, target):
    """The Relax executable of an exported library, after the checks that keep a bad file from
    crashing the process (CPU features, a truncated ELF)."""
    from .target import check_runs_on_host
    check_runs_on_host(target, path)   # before the library is mapped: no SIGILL later
    check_elf_library(path)
    try:
        lib = tvm.runtime.load_module(path)
        return relax.VMExecutable(lib) if hasattr(relax, "VMExecutable") else lib
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path} is not a loadable TVM module ({e})") from e


def module_from_meta(ex, target, meta: dict, entry: str = "main") -> CompiledModule:
    """A CompiledModule running function `entry` of `ex`, described by `meta` (module_meta's dict)."""
    return CompiledModule(ex, target, meta["input_kinds"], info_from_data(meta["output_info"]),
                          vocab_sizes={int(k): v for k, v in meta["vocab_sizes"].items()},
                          input_shapes=meta.get("input_shapes"),
                          state_formats=_state_formats_from_meta(meta),
                          state_batch_of=meta.get("state_batch_of"), amx=bool(meta.get("amx", False)),
                          entry=entry, input_scales=meta.get("input_scales"))


def _state_formats_from_meta(meta: dict) -> list:
    from .quant.state_format import StateFormat
    try:
        return [StateFormat.from_data(d) for d in meta.get("state_formats", [])]
    except (TypeError, ValueError) as e:
        raise ValueError(f"the module's .json metadata has malformed state_formats ({e}); export it again") from e


def weight_route_hint(model, target) -> str | None:
    """A hint for `compile`'s progress output, or None: on AVX2, a model whose LSTM / linear
    weights leave [-64, 64] (QuantConfig(weight_bits=8), the default) takes the exact full-range
    vpmaddwd kernels; 7-bit weights would take the u8 x s8 kernels, ~1.2x faster on this kind of
    CPU (BENCHMARKS.md), for a little accuracy. Not on other targets (no such difference there)."""
    from .kernels import resolve_isa, weights_fit_u8
    from .nn.intmodules import IntLinear, IntLSTM
    if resolve_isa(_target(target)) != "avx2":
        return None
    for m in model.gm.modules():
        if isinstance(m, IntLinear):
            ws = [m.w]
        elif isinstance(m, IntLSTM):
            ws = [b for n, b in m.named_buffers() if n.endswith(("_w_x", "_w_h"))]
        else:
            continue
        if any(w.numel() and not weights_fit_u8(w.numpy()) for w in ws):
            return ("hint: the weights use the full 8-bit range, so on AVX2 the GEMMs take the exact "
                    "vpmaddwd kernels; quantized with QuantConfig(weight_bits=7) they would take the "
                    "u8 x s8 (vpmaddubsw) kernels, ~1.2x faster on this CPU, for ~8 % more output "
                    "error against FP32 (BENCHMARKS.md)")
    return None


def _uses_amx(mod) -> bool:
    from .kernels import uses_amx
    return any(isinstance(f, tvm.tirx.PrimFunc) and uses_amx(f) for f in mod.functions.values())


def compile(model, target="host", example_inputs: Sequence = None, tuning_logs=None, verbose: bool = True,  # noqa: A001
            threads: bool = False, kernels: str | None = None) -> CompiledModule:
    """Compile a quantized model (tvm_intlstm.quantize / prepare_qat result) to an integer-only module.

    kernels: the kernel family (tvm_intlstm.kernels.isa, docs/compiler.md) instead of the one the
    target's features pick, e.g. "amx" (AMX-INT8 tiles for the linear GEMMs with many rows: opt-in
    until its bit-exactness tests have run on AMX hardware) or "avx2"; the target must support it
    (ValueError naming the features otherwise). None: the target's default family.

    threads=True: the LSTM kernels use TVM's thread pool (`TVM_NUM_THREADS` workers; on AVX2 the
    threaded recurrent form, a barrier per time step, and the parallel input projection): faster on
    an otherwise idle machine (~0.55-0.6x the step time with 2 workers on 2 cores), much slower when
    other processes compete for the cores. The default (False) builds a module that never uses the
    pool (docs/compiler.md "Threads")."""
    from .quant.api import QATModel
    if isinstance(model, QATModel):
        model = model.convert()
    if not isinstance(model, QuantizedModel):
        raise TypeError(f"compile takes a quantized model (tvm_intlstm.quantize(...) or prepare_qat), got "
                        f"{type(model).__name__}; a float model must be quantized first")
    if example_inputs is None:
        raise ValueError("compile needs example_inputs (a tuple of inputs of the right dtype and rank)")
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    # contiguous: torch.export guards a view's strides against its sizes (x[:, :3] of a [B, 20]
    # tensor gives the guard T != 20, which breaks the symbolic time dim)
    example_inputs = tuple(torch.as_tensor(x).contiguous() for x in example_inputs)
    tgt, family = checked_target(target, kernels)
    from .kernels import isa as families
    with families.prefer(family):
        return _compile(model, tgt, example_inputs, tuning_logs, verbose, threads)


def checked_target(target, kernels=None):
    """(tvm Target, kernel family asked for or None) of compile's `target` / `kernels` arguments:
    an IEEE-float target (check_ieee_float) and a family it can run (ValueError otherwise)."""
    from .kernels import isa as families
    from .target import check_ieee_float
    tgt = _target(target)
    check_ieee_float(tgt)
    return tgt, None if kernels is None else families.check_supported(kernels, tgt)


def lower_and_build(mod, tgt, tuning_logs, threads: bool, verbose: bool):
    """(lowered IRModule, executable): the integer pipeline (with the tuning logs' kernels, if any)
    and TVM's build, for every function of `mod` (one model, or an encoder-decoder's two)."""
    tuned = None
    if tuning_logs:
        from .tuning import apply_tuning_logs
        tuned = apply_tuning_logs(tuning_logs, tgt)
        _log(f"tuning logs {tuning_logs}: {tuned}", verbose)
    with tgt:
        lowered = integer_pipeline(tgt, tuned, threads=threads)(mod)
    _log("building", verbose)
    return lowered, tvm.compile(lowered, target=tgt)


def _compile(model, tgt, example_inputs, tuning_logs, verbose, threads):
    t0 = time.perf_counter()
    _log("importing (torch.export -> Relax)", verbose)
    mod = import_quantized(model, example_inputs)
    input_shapes = input_shapes_of(mod["main"])
    state_batch_of = _state_batch_of(mod["main"], model.state_formats())
    _log(f"lowering to integer kernels for {tgt.attrs.get('mcpu', '') or tgt.kind.name}", verbose)
    if verbose:
        hint = weight_route_hint(model, tgt)
        if hint:
            _log(hint, verbose)
    lowered, ex = lower_and_build(mod, tgt, tuning_logs, threads, verbose)
    _log(f"done in {time.perf_counter() - t0:.1f} s", verbose)
    return CompiledModule(ex, tgt, model.input_kinds, model.output_info, lowered, vocab_sizes(model), input_shapes,
                          model.state_formats(), state_batch_of, amx=_uses_amx(lowered),
                          input_scales=model.input_scales)


def vocab_sizes(model) -> dict:
    """{input index: vocabulary size} of the token-id inputs feeding an embedding directly."""
    vocab = {}
    from .nn.intmodules import IntEmbedding
    for node in model.gm.graph.nodes:
        if node.op == "call_module" and isinstance(model.gm.get_submodule(node.target), IntEmbedding):
            src = node.args[0]
            if src.op == "placeholder":
                idx = [n for n in model.gm.graph.nodes if n.op == "placeholder"].index(src)
                vocab[idx] = int(model.gm.get_submodule(node.target).table.shape[0])
    return vocab


def input_shapes_of(func) -> list:
    """Per parameter of a Relax function: its dims, an int for a static dim, None for a symbolic one."""
    return [[int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in p.ty.shape.values] for p in func.params]
