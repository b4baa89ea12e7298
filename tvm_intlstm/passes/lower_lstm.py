"""LowerLSTM(target, tuned=None, threads=False): one LSTM direction -> a batched int8 GEMM for the
input projection of all time steps (requantized to the int16 gate domain) plus one fused recurrent
kernel with the time loop inside (recurrent GEMV, PWL sigmoid/tanh from the layer's integer tables,
cell and hidden update).

threads=True picks the kernels that use TVM's thread pool where they exist (AVX2: the threaded
recurrent form, a barrier per time step, and the parallel input projection); the default picks the
serial forms, which do not slow down when other processes compete for the cores (`threaded_forms`,
docs/compiler.md "Threads")."""
from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax.expr_functor import mutator

from .. import kernels as K
from ._lowering import (OpLowering, const_numpy, _shape, _shifts_hi, _static,
                        lowering_pass, u8_route, uniform_scale)


def threaded_forms(threads: bool, constant: bool) -> bool:
    """Does an LSTM direction get the thread-pool kernels (the threaded recurrent form and the
    parallel input projection)? Only when threads were asked for (`compile(threads=True)`) and the
    projection's constants can be permuted to the threaded form's gate order (always, from the
    quantizer). A barrier per time step collapses when a worker is descheduled: on a 2-core machine
    with other CPU-bound processes a 22 us call took 0.5-70 ms (issue 16), so it is never the
    default."""
    return bool(threads) and bool(constant)


@mutator
class _LowerLSTMMutator(OpLowering):
    def _lower_lstm_direction(self, a):
        x, w_x, w_h, bias, mx, sx, mh, sh = a.x, a.w_x, a.w_h, a.bias, a.mx, a.sx, a.mh, a.sh
        sig, tanh, tanh_c, mo, so, cf, rev = a.sig, a.tanh, a.tanh_c, a.mo, a.so, a.cell_frac, a.reverse
        # the initial (h0, c0), if the model takes states (docs/stateful.md): both or neither
        if (a.h0 is None) != (a.c0 is None):
            raise NotImplementedError("an LSTM direction with only one of h0 / c0 cannot be compiled: "
                                      "pass both")
        state = () if a.h0 is None else (a.h0, a.c0)
        G, I = (_static(v, "LSTM size") for v in _shape(w_x))
        H = G // 4
        T_, B_ = _shape(x)[:2]
        pieces = [_static(_shape(t)[1], "PWL table") - 1 for t in (sig, tanh, tanh_c)]
        # constant W_h (always, from the quantizer): packed for the micro-kernel, and the u8 x s8
        # route when it lies in [-64, 64] on AVX2 (see _lowering._gemm); else the natural layout
        W = const_numpy(w_h)
        packed = W is not None
        # the threaded recurrent kernel reads gx, mh, sh in its gate-interleaved channel order: the
        # projection then gets its weight rows and per-channel constants in that order (so it
        # writes gx so), which needs them to be constants (always, from the quantizer)
        proj = [w_x, bias, mx, sx, mh, sh]
        consts = [const_numpy(v) for v in proj]
        constant = packed and all(c is not None for c in consts)
        threaded = threaded_forms(self.threads, constant)
        # on AVX2 the recurrent kernel runs a multiple of 8 units (K.recurrent_units): the extra
        # units get zero weights (W_x and W_h rows, W_h columns) and their outputs are sliced off
        isa = K.resolve_isa(self.target)
        HP = K.recurrent_units(H, isa) if constant else H
        if HP != H:
            consts = [K.pad_units(c, H, HP, 0, f)
                      for c, f in zip(consts, ("zero", "zero", "edge", "edge", "edge", "edge"))]
            W = np.pad(K.pad_units(W, H, HP, 0), ((0, 0), (0, HP - H)))
            w_x, bias, mx, sx, mh, sh = (relax.const(c, str(c.dtype)) for c in consts)
            G = 4 * HP
        hx, hh = _shifts_hi(sx), _shifts_hi(sh)
        scx, sch = uniform_scale(mx, sx), uniform_scale(mh, sh)
        w7 = u8_route(W, None, isa)   # (W_h: its correction is the kernel's corr input)
        # constant PWL tables (always, from the quantizer) that allow it: the cell's folded form
        tables = [const_numpy(t) for t in (sig, tanh, tanh_c)]
        fold = all(t is not None and K.pwl_foldable(t) for t in tables)
        # ... and the tables whose knots allow the one-round piece index of the 16-lane cells
        bins = tuple(None if t is None else K.pwl_bin_shift(t) for t in tables)
        key = ("lstm_recurrent", HP, mo, so, cf, *pieces, bool(rev), w7, packed, hh, sch, threaded,
               fold, bins, str(self.target)) + (("init_state",) if state else ())
        gv = self._kernel(key, lambda: K.lstm_recurrent(
            HP, mo=mo, so=so, cell_frac=cf, sig_pieces=pieces[0], tanh_pieces=pieces[1],
            tanh_c_pieces=pieces[2], reverse=bool(rev), target=self.target, w7=w7, packed=packed,
            shift_hi=hh, gate_scale=sch, parallel=threaded, pwl_fold=fold, pwl_bins=bins,
            init_state=bool(state)))
        func = self.cache[("func",) + key]
        if constant and K.gate_interleaved(func):
            w_x, bias, mx, sx, mh, sh = (relax.const(K.gate_order(func, c, axis=0), str(c.dtype))
                                         for c in consts)
        gvx, w_x, bias = self._gemm("linear_requant" + ("_hi" if hx else ""), I, G, "int16", w_x,
                                    bias, lambda w7, packed: K.linear_requant(
                                        I, G, "int16", True, target=self.target, w7=w7,
                                        packed=packed, shift_hi=hx, scale=scx, parallel=threaded),
                                    variant=(scx, "parallel") if threaded else (scx,), scale=scx)
        gx = self._call_rows(gvx, x, [w_x, bias, mx, sx], G, "int16")
        if packed:
            wk, _, corr = K.prepare_weights(func, W)
            w_args = [relax.const(wk, "int8"), mh, sh, relax.const(corr, "int32")]
        else:   # non-constant W_h (never from the quantizer): natural layout, zero correction
            w_args = [w_h, mh, sh, relax.const(np.zeros(4 * H, np.int32), "int32")]
        out_ty = [relax.TensorType([T_, B_, HP], "int8"), relax.TensorType([B_, HP], "int8"),
                  relax.TensorType([B_, HP], "int16")]
        state_args = self._padded_states(state, B_, H, HP)
        out = self.builder_.emit(relax.call_tir(gv, [gx] + w_args + [sig, tanh, tanh_c] + state_args, out_ty))
        if HP == H:
            return out
        return self.builder_.emit(relax.Tuple([
            self.builder_.emit(relax.op.strided_slice(self.builder_.emit(relax.TupleGetItem(out, i)),
                                                      axes=[2 if i == 0 else 1], begin=[0], end=[H]))
            for i in range(3)]))

    def _padded_states(self, state, B_, H, HP):
        """The kernel's h0 / c0 arguments: the given states, widened with zeros to the kernel's HP
        units (the padded units have zero weights, so a zero state keeps them at zero)."""
        if not state:
            return []
        if HP == H:
            return list(state)
        return [self.builder_.emit(relax.op.concat(
            [s, relax.op.zeros(relax.ShapeExpr([B_, HP - H]), dt)], axis=1))
            for s, dt in zip(state, ("int8", "int16"))]


LowerLSTM = lowering_pass(_LowerLSTMMutator, "tvm_intlstm.LowerLSTM")
