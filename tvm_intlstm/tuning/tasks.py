"""The GEMM tasks of a quantized model: what `tune` tunes and what the records are keyed by.

Tasks. The GEMMs of a compiled model are the `intlstm.linear_i32` / `intlstm.linear_requant`
placeholder calls and the input projection of every `intlstm.lstm_direction` and
`intlstm.ln_lstm_direction` (gx = x W_x^T over all
T*B rows, int16 out). `extract_tasks` imports the model with static shapes and reads the weight
shapes (K, O), the output dtype and the row count of each; tasks with equal (K, O, out_dtype) are
one task (the largest row count is kept).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from . import gemm as G
from . import x86_wide

GEMM_ATTR = "intlstm.gemm"          # "K,O,out_dtype,rows,layout" on every workload function
LAYOUT = "o8k2"                     # weights pre-packed by gemm.pack_weights
LAYOUT_W7 = "o8k4w7"                # 7-bit weights: x86_wide.pack_weights_vnni(W, 8), bias'



@dataclass(frozen=True)
class GemmTask:
    K: int
    O: int
    out_dtype: str     # "int8" / "int16" (requantizing) or "int32" (final linear)
    rows: int          # the static N the task is tuned for
    source: str = ""   # where it comes from, e.g. "lstm_direction" (for the progress lines)
    u8_weights: bool = False   # weights in [-64, 64] and a bias that stays int32 once corrected
                               # (`passes._lowering.u8_route`): on AVX2 the u8 x s8 (vpmaddubsw)
                               # kernels, default and tuned (`w7_kernel`)

    @property
    def key(self) -> tuple:
        return (self.K, self.O, self.out_dtype)

    @property
    def name(self) -> str:
        return f"gemm_k{self.K}_o{self.O}_{self.out_dtype}_n{self.rows}"

    def w7_kernel(self, isa: str) -> bool:
        """Is this task tuned (and applied) as the u8 x s8 kernel for kernel family `isa` (AVX2's
        7-bit vpmaddubsw kernel, x86_vnni's vpdpbusd kernel)? Records so tuned are keyed 'w7'."""
        from ..kernels import isa as families  # pylint: disable=import-outside-toplevel
        return bool(self.u8_weights) and families.family(isa).u8_route(True, True)

    def space_isa(self, isa: str) -> str | None:
        """The design space (tuning.gemm / x86_wide isa name) of this task for kernel family `isa`."""
        from ..kernels import isa as families  # pylint: disable=import-outside-toplevel
        return families.family(isa).tuning_isa(self.w7_kernel(isa))

    def trial_weight_max(self, isa: str) -> int:
        """Bound of the random weights of the trials: 64 where the space's micro-kernel is only
        exact for 7-bit weights (AVX2's vpmaddubsw), else the full 127."""
        return 64 if self.space_isa(isa) == x86_wide.W7_ISA else 127

    def workload(self, w7: bool = False):
        """The static-N block-form kernel as an IRModule (the MetaSchedule workload): the o8k2
        vpmaddwd kernel, or with w7=True the u8 block kernel of x86_wide (layout o8k4) that the
        space tensorizes with vpmaddubsw (x86_wide.W7_ISA)."""
        import tvm  # pylint: disable=import-outside-toplevel

        if w7:
            f = x86_wide.gemm_blocks_wide(self.K, self.O, self.out_dtype, n_rows=self.rows,
                                          name="main", lanes=8)
        else:
            f = G.gemm_blocks(self.K, self.O, self.out_dtype, n_rows=self.rows, name="main",
                              packed=True)
        layout = LAYOUT_W7 if w7 else LAYOUT
        f = f.with_attr(GEMM_ATTR, f"{self.K},{self.O},{self.out_dtype},{self.rows},{layout}")
        return tvm.IRModule({"main": f})


def tuned_key(K, O, out_dtype, w7: bool = False) -> tuple:
    """The key of a tuned kernel in `TunedKernels` and `kept_default`: (K, O, out_dtype), with a
    fourth element "w7" for the 7-bit u8 x s8 kernels."""
    return (int(K), int(O), str(out_dtype)) + (("w7",) if w7 else ())


def default_key(K, O, out_dtype, rows, w7: bool) -> str:
    """The key of a task's default-kernel time in defaults.json."""
    return f"{K},{O},{out_dtype},{rows}" + (",w7" if w7 else "")


def _walk_calls(expr, out):
    from tvm import relax  # pylint: disable=import-outside-toplevel

    if isinstance(expr, relax.Function):
        _walk_calls(expr.body, out)
    elif isinstance(expr, relax.SeqExpr):
        for blk in expr.blocks:
            for b in blk.bindings:
                _walk_calls(b.value, out)
        _walk_calls(expr.body, out)
    elif isinstance(expr, relax.Call):
        out.append(expr)
    elif isinstance(expr, relax.If):
        _walk_calls(expr.true_branch, out)
        _walk_calls(expr.false_branch, out)


def tasks_from_module(mod, rows: int | None = None, default_rows: int = 64,
                      isa: str | None = None) -> list[GemmTask]:
    """GEMM tasks of an imported Relax module (see the module doc). Symbolic row counts become
    `default_rows`; `rows` overrides every row count. With the kernels' `isa`, an LSTM input
    projection has as many gate channels as the compiler gives it for that ISA
    (`kernels.recurrent_units`: on AVX2 the units are padded to a multiple of 8)."""
    import tvm  # pylint: disable=import-outside-toplevel
    from tvm import relax  # pylint: disable=import-outside-toplevel

    from ..frontend.importer import op_args  # pylint: disable=import-outside-toplevel
    from ..kernels import recurrent_units  # pylint: disable=import-outside-toplevel
    from ..passes._lowering import const_numpy, u8_route  # pylint: disable=import-outside-toplevel

    def shape(e):
        return list(e.ty.shape.values)

    def nrows(dims):
        n = 1
        for d in dims:
            if not isinstance(d, (int, tvm.tirx.IntImm)):
                return default_rows
            n *= int(d)
        return max(n, 1)

    found: dict = {}
    for _, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        calls: list = []
        _walk_calls(func, calls)
        for call in calls:
            placeholder = op_args(call)   # (op name, arguments by name) of an intlstm.* call
            if placeholder is None:
                continue
            op, a = placeholder
            # the GEMM of each op with one: rows of x times the weight [O, K]^T, plus the bias
            if op in ("linear_i32", "linear_requant"):
                w, b, n = a.w, a.b, nrows(shape(a.x)[:-1])
                dt = "int32" if op == "linear_i32" else f"int{a.out_bits}"
            elif op == "lstm_direction":   # the input projection of all time steps
                w, b, n, dt = a.w_x, a.bias, nrows(shape(a.x)[:2]), "int16"
            elif op == "ln_lstm_direction":   # its projection has no bias (the layer norm's beta)
                w, b, n, dt = a.w_x, None, nrows(shape(a.x)[:2]), "int16"
            else:
                continue
            O, K = shape(w)
            if op == "lstm_direction" and isa is not None:
                O = 4 * recurrent_units(int(O) // 4, isa)
            # (what the lowering decides on AVX2, from the weights and the bias it corrects)
            u8 = u8_route(const_numpy(w), b, isa or "avx2")
            t = GemmTask(int(K), int(O), dt, int(rows) if rows else n, op, u8)
            old = found.get((t.key, u8))
            if old is not None:   # one GEMM shape and weight range, several layers: one task
                t = dataclasses.replace(t, rows=max(t.rows, old.rows))
            found[(t.key, u8)] = t
    return sorted(found.values(), key=lambda t: (t.K, t.O, t.out_dtype, t.u8_weights))


def extract_tasks(model, example_inputs, rows: int | None = None,
                  isa: str | None = None) -> list[GemmTask]:
    """The GEMM tasks of a quantized model (tvm_intlstm.quantize / prepare_qat result), with the
    row counts of `example_inputs` (T*B for an LSTM input projection) unless `rows` is given; `isa`
    as for `tasks_from_module` (tune passes its target's)."""
    import torch  # pylint: disable=import-outside-toplevel

    from ..frontend.importer import import_quantized  # pylint: disable=import-outside-toplevel
    from ..quant.api import QATModel  # pylint: disable=import-outside-toplevel

    if isinstance(model, QATModel):
        model = model.convert()
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    example_inputs = tuple(torch.as_tensor(x) for x in example_inputs)
    mod = import_quantized(model, example_inputs, dynamic=False)
    return tasks_from_module(mod, rows=rows, isa=isa)
