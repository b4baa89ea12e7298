"""What the block-form GEMM kernels of gemm.py (AVX2) and x86_wide.py (AVX-512 / VNNI) share: the
row padding, the block-form kernel itself (`gemm_block_kernel`: source, optional weight, gemm and
epilogue blocks), the requantizing epilogue, the tensor intrinsics' signature (`dot_desc`,
`dot_impl`) and the sampled decisions of their design spaces. A leaf module, so that neither
kernel file imports the other for it."""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from ..kernels._common import requantizer, without_params
from ..kernels._tir import add_i32

ROW_PAD = 8        # the product's rows are padded to a multiple of this
NT_CHOICES = (1, 2, 4, 8)
UNROLL_CHOICES = (0, 16, 64, 512)


def requant_epilogue(out_dtype: str, scale: tuple | None = None):
    """The epilogue of the requantizing block kernels (gemm.gemm_blocks and
    `x86_wide.gemm_blocks_wide`):
    (acc, b, M, s buffers, channel o) -> requantize_N(acc + b[o], M[o], s[o]) (spec 5, 2), with
    `scale` baked in as for kernels.linear_requant and the sum written with `_tir.add_i32` (so the
    requantize stays one vpmuldq per 4 lanes). For out_dtype int32 the plain sum acc + b[o] (the
    requantizing kernel is parsed for every dtype, then loses its M and s parameters)."""
    if out_dtype == "int32":
        return lambda acc, Bb, Mb, Sb, o: acc + Bb[o]
    rq = requantizer(False, scale)
    bits = int(out_dtype[3:])
    return lambda acc, Bb, Mb, Sb, o: rq(add_i32(acc, Bb[o]), Mb[o], Sb[o], bits)


def sample_tiles(sch, gemm, dec: dict, o_vec: int, max_o_vectors: int, k_step: int) -> tuple:
    """The decisions both design spaces sample, in this order (a trace replays them by position):
    the row tile nt (NT_CHOICES), the output channels as (panel, vectors per register tile) of
    o_vec channels each, and k as (k0, k1) of k_step each; `dec` fixes some ("nt", "o_tile",
    "k_tile"). Returns the loops (n0, n1, o0, o1, o_vec lanes, k0, k1, k_step lanes)."""
    n, o, k = sch.get_loops(gemm)
    nt = sch.sample_categorical(list(NT_CHOICES), [1.0 / len(NT_CHOICES)] * len(NT_CHOICES),
                                decision=NT_CHOICES.index(dec["nt"]) if "nt" in dec else None)
    n0, n1 = sch.split(n, [None, nt])
    oq, ov = sch.split(o, [None, o_vec])
    o0, o1 = sch.split(oq, sch.sample_perfect_tile(oq, n=2, max_innermost_factor=max_o_vectors,
                                                   decision=dec.get("o_tile")))
    kq, ks = sch.split(k, [None, k_step])
    k0, k1 = sch.split(kq, sch.sample_perfect_tile(kq, n=2, max_innermost_factor=128,
                                                   decision=dec.get("k_tile")))
    return n0, n1, o0, o1, ov, k0, k1, ks


def finish_tiles(sch, epi, n0, n1, o1, epi_vec: int | None, dec: dict) -> None:
    """The end both design spaces share: the register tile's row and vector loops unrolled, the
    epilogue's channels vectorized by epi_vec (None: not), and the sampled unroll pragma
    (UNROLL_CHOICES; `dec` may fix "unroll") on the row-tile loop n0."""
    sch.unroll(n1)
    sch.unroll(o1)
    if epi_vec is not None:
        eo = sch.get_loops(epi)[-1]
        _, ev = sch.split(eo, [None, epi_vec])
        sch.vectorize(ev)
    unroll = sch.sample_categorical(
        list(UNROLL_CHOICES), [1.0 / len(UNROLL_CHOICES)] * len(UNROLL_CHOICES),
        decision=UNROLL_CHOICES.index(dec["unroll"]) if "unroll" in dec else None)
    # the pragmas RewriteParallelVectorizeUnroll would derive from "meta_schedule.unroll_explicit",
    # set directly: the trace then needs no postprocessor and replays as it is on symbolic N
    sch.annotate(n0, "pragma_auto_unroll_max_step", unroll)
    sch.annotate(n0, "pragma_unroll_explicit", 1)


def check_linear(in_features: int, out_features: int, out_dtype: str) -> tuple[int, int]:
    """(K, O) of a block-form linear kernel, checked (spec 5)."""
    K, O = int(in_features), int(out_features)
    if K <= 0 or O <= 0:
        raise ValueError(f"linear sizes must be positive, got K={K}, O={O}")
    if K > 2**16:
        raise ValueError("spec 5 bounds K <= 2^16")
    if out_dtype not in ("int8", "int16", "int32"):
        raise ValueError(f"out_dtype must be int8, int16 or int32, got {out_dtype}")
    return K, O


def gemm_block_kernel(K: int, O: int, KP: int, OP: int, out_dtype: str, n_rows: int | None,
                      wshape, source: tuple, wread, w16: tuple | None = None,
                      scale: tuple | None = None) -> tirx.PrimFunc:
    """The block-form linear kernel of gemm.gemm_blocks and x86_wide.gemm_blocks_wide: parameters
    (x, W, b, M, s, y), (x, W, b, y) for out_dtype int32, x int8 [N, K] (N = n_rows, or symbolic),
    W int8 `wshape`. Blocks:
      source (name, dtype, widen, pad): XS [NP, KP] = widen(x) inside x, pad outside (NP: the
        rows padded to ROW_PAD);
      "w16" if w16 = (shape, wext): a scratch W16 of that shape, filled with wext(W, o, k) for
        [OP, KP] (the weights packed per call); w16 = (shape, None): the scratch only;
      "gemm": ACC [NP, OP] = sum_k int32(XS[n, k]) * wread(W, W16 or None, o, k);
      "epilogue": y = `requant_epilogue(out_dtype, scale)` of ACC and b."""
    # the row count: a fresh symbolic var (bound by the buffers), or the static specialization
    N = tirx.Var("N", "int64") if n_rows is None else tirx.IntImm("int64", int(n_rows))
    # rows of the product padded to a multiple of ROW_PAD (zero rows, never stored), so that every
    # row tile in NT_CHOICES divides them: no predicate, which tensorize cannot take
    NP = (int(n_rows) + ROW_PAD - 1) // ROW_PAD * ROW_PAD if n_rows is not None else \
        tirx.floordiv(N + (ROW_PAD - 1), ROW_PAD) * ROW_PAD
    if n_rows is not None:
        NP = tirx.IntImm("int64", NP)
    src_name, src_dtype, widen, pad = source
    epilogue = requant_epilogue(out_dtype, scale)

    @T.prim_func(s_tir=True)
    def gemm(x_h: T.handle, w_h: T.handle, b_h: T.handle, m_h: T.handle, s_h: T.handle,
             y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        X = T.match_buffer(x_h, (N, K), "int8")
        W = T.match_buffer(w_h, wshape, "int8")
        Bb = T.match_buffer(b_h, (O,), "int32")
        Mb = T.match_buffer(m_h, (O,), "int32")
        Sb = T.match_buffer(s_h, (O,), "int32")
        Y = T.match_buffer(y_h, (N, O), out_dtype)
        XS = T.sblock_alloc_buffer((NP, KP), src_dtype)
        if w16 is not None:
            W16 = T.sblock_alloc_buffer(w16[0], "int16")
        ACC = T.sblock_alloc_buffer((NP, OP), "int32")
        for n, k in T.grid(NP, KP):
            with T.sblock(src_name):
                vn, vk = T.axis.remap("SS", [n, k])
                XS[vn, vk] = T.if_then_else(
                    vn < N and vk < K, widen(X[T.min(vn, N - 1), T.min(vk, K - 1)]), pad)
        if w16 is not None and w16[1] is not None:
            for o, k in T.grid(OP, KP):
                with T.sblock("w16"):
                    vo, vk = T.axis.remap("SS", [o, k])
                    W16[vo, vk] = w16[1](W, vo, vk)
        for n, o, k in T.grid(NP, OP, KP):
            with T.sblock("gemm"):
                vn, vo, vk = T.axis.remap("SSR", [n, o, k])
                with T.init():
                    ACC[vn, vo] = 0
                ACC[vn, vo] = ACC[vn, vo] + T.Cast("int32", XS[vn, vk]) * wread(
                    W, W16 if w16 is not None else None, vo, vk)
        for n, o in T.grid(N, O):
            with T.sblock("epilogue"):
                vn, vo = T.axis.remap("SS", [n, o])
                Y[vn, vo] = epilogue(ACC[vn, vo], Bb, Mb, Sb, vo)

    return gemm if out_dtype != "int32" else without_params(gemm, "Mb", "Sb")


# --- tensor intrinsics: lanes int32 outputs += the k products of each lane ----------------------
def dot_intrin(lanes: int, k: int, a_dtype: str, b_dtype: str, step,
               name: str = "impl") -> tirx.PrimFunc:
    """A description or implementation (called `name`) of a lanes x k dot step, A [k],
    B [lanes, k], C int32 [lanes]: its body is the macro step(A, B, C) (the loop nest, or the
    instructions)."""
    @T.prim_func(s_tir=True)
    def intrin(A: T.Buffer((k,), a_dtype, offset_factor=1),
               B: T.Buffer((lanes, k), b_dtype, offset_factor=1),
               C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:k], B[0:lanes, 0:k])
            T.writes(C[0:lanes])
            step(A, B, C)
    return intrin.with_attr("global_symbol", name)


def dot_desc(lanes: int, k: int, a_dtype: str, b_dtype: str,
             name: str = "desc") -> tirx.PrimFunc:
    """The description: C[i] += sum_j int32(A[j]) * int32(B[i, j])."""
    @T.macro
    def update(A, B, C):
        for i, j in T.grid(lanes, k):
            with T.sblock("update"):
                vi, vk = T.axis.remap("SR", [i, j])
                C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vi, vk])

    return dot_intrin(lanes, k, a_dtype, b_dtype, update, name)
