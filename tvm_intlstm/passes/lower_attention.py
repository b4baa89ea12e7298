"""LowerAttention(target): the attention operators of docs/integer_spec.md section 11 -> TIR kernels:
scores (`attention_dot`, `additive_scores`, `mha_scores`: kernels/attention.py), the masked softmax
(kernels/attention.py), the unmasked softmax with a symbolic source length and the context
(kernels/norm.py). The projections of an attention layer (Luong "general", Bahdanau's W_q q and
W_k k, multi-head attention's q/k/v and output projections) are `linear_requant` ops, lowered by
LowerLinear like any hidden linear layer (W_k k for every source position in one GEMM); the
multi-head layer's head split of the values and head concat of the contexts are layout ops.
"""
from __future__ import annotations

from tvm import relax
from tvm.relax.expr_functor import mutator

from .. import kernels as K
from ..kernels import attention as KA
from ._lowering import OpLowering, _shape, _static, lowering_pass


def _is_one(d) -> bool:
    try:
        return int(d) == 1
    except TypeError:   # symbolic
        return False


def _product(dims):
    out = 1
    for d in dims:
        out = out * d
    return out


@mutator
class _LowerAttentionMutator(OpLowering):
    def _emit(self, gv, args, shape, dtype):
        return self.builder_.emit(relax.call_tir(gv, list(args), relax.TensorType(list(shape), dtype)))

    def _reshape(self, x, shape):
        return self.builder_.emit(relax.op.reshape(x, list(shape)))

    def _table_pieces(self, table, what):
        return _static(_shape(table)[1], f"{what} table size") - 1

    def _lower_attention_dot(self, a):
        qs, ks = _shape(a.q), _shape(a.k)
        D = _static(qs[-1], "attention feature size")
        gv = self._kernel(("attention_dot", D), lambda: KA.attention_dot(D))
        return self._emit(gv, [a.q, a.k], [qs[0], qs[1], ks[1]], "int32")

    def _lower_additive_scores(self, a):
        qs, ks = _shape(a.qx), _shape(a.kx)
        A = _static(qs[-1], "attention size")
        n = self._table_pieces(a.tanh_table, "tanh")
        gv = self._kernel(("additive_scores", A, n), lambda: KA.additive_scores(A, n))
        return self._emit(gv, [a.qx, a.kx, a.v, a.tanh_table], [qs[0], qs[1], ks[1]], "int32")

    def _lower_mha_scores(self, a):
        qs, ks = _shape(a.q), _shape(a.k)
        E = _static(qs[-1], "attention embedding size")
        gv = self._kernel(("mha_scores", E, a.num_heads), lambda: KA.mha_scores(E, a.num_heads))
        return self._emit(gv, [a.q, a.k], [qs[0], a.num_heads, qs[1], ks[1]], "int32")

    def _lower_softmax(self, a):
        n = self._table_pieces(a.exp_table, "exp")
        S = _shape(a.z)[-1]   # symbolic: one kernel for every source length
        gv = self._kernel(("softmax", n, a.mz, a.sz), lambda: K.softmax(n, a.mz, a.sz))
        return self._call_rows(gv, a.z, [a.exp_table], S, "int16")

    def _lower_masked_softmax(self, a):
        zs = _shape(a.z)
        n = self._table_pieces(a.exp_table, "exp")
        len_dtype = str(a.lengths.ty.dtype)
        gv = self._kernel(("masked_softmax", n, a.mz, a.sz, len_dtype),
                          lambda: KA.masked_softmax(n, a.mz, a.sz, len_dtype))
        # [B, ..., S] -> [B, R, S]: the kernel masks every row of batch b by lengths[b]
        shape3 = [zs[0], _product(zs[1:-1]), zs[-1]]
        z3 = a.z if len(zs) == 3 else self._reshape(a.z, shape3)
        p3 = self._emit(gv, [z3, a.lengths, a.exp_table], shape3, "int16")
        return p3 if len(zs) == 3 else self._reshape(p3, zs)

    def _lower_attention_context(self, a):
        ps, vs = _shape(a.p), _shape(a.v)
        if len(vs) != len(ps) + 1 or len(ps) < 1:
            raise ValueError(f"attention_context takes p [..., K] and v [..., K, D], got {ps} and {vs}")
        D = _static(vs[-1], "attention value size")
        if len(ps) >= 2 and _is_one(vs[-3]):
            # p [..., Q, K] against v [..., 1, K, D]: the Q queries of a batch row share its values
            B, Q = _product(ps[:-2]), ps[-2]
        else:
            # one query per value set: p [..., K], v [..., K, D] with the same leading dims
            B, Q = _product(ps[:-1]), 1
        K_ = ps[-1]
        p3 = self._reshape(a.p, [B, Q, K_])
        v3 = self._reshape(a.v, [B, K_, D])
        gv = self._kernel(("attention_context", D, a.mc, a.sc), lambda: K.attention_context(D, a.mc, a.sc))
        ctx = self._emit(gv, [p3, v3], [B, Q, D], "int8")
        return self._reshape(ctx, ps[:-1] + [D])


LowerAttention = lowering_pass(_LowerAttentionMutator, "tvm_intlstm.LowerAttention")
