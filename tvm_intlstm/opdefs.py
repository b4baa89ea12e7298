"""The integer operators of docs/integer_spec.md, each declared once.

An `OpDef` names the operator, lists its parameters in call order (tensor operands with their
dtypes, and the scalar attributes baked into its kernels), gives its output rule (the output
shapes and dtypes as a pure function of the operand shapes and the attributes) and names its numpy
reference function. Everything else is derived from these declarations:

- the PyTorch op `torch.ops.intlstm.<name>`: its schema and its fake (shape-only) implementation
  (nn/intops.py registers the function of the same name there);
- the importer's converter: the op becomes `R.call_dps_packed("intlstm.<name>", (operands...,
  attrs...))`, operands first in declaration order, then the attributes as prim values
  (frontend/importer.py); `frontend.importer.op_args` reads such a call back by name for the
  lowering passes and tuning's task extraction;
- the reference dispatch: `reference_function(name)` is the numpy function in
  tvm_intlstm/reference/ops.py, called with the same arguments as the torch op.

No torch, no tvm: this module and the numpy reference import with neither (tests/test_import_doors.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

from .reference import ops as _reference   # numpy only

OP_NAMESPACE = "intlstm"     # torch.ops.intlstm.<name>; the Relax placeholders are "intlstm.<name>"
INT_DTYPES = ("int8", "int16", "int32", "int64")


@dataclass(frozen=True)
class Tensor:
    """A tensor operand: `dtypes` lists the dtypes it may have (numpy/torch names)."""

    name: str
    dtypes: Union[str, tuple]  # one dtype name or a tuple of them (stored as a tuple)
    optional: bool = False     # may be None (absent); only after every required parameter

    def __post_init__(self):
        if isinstance(self.dtypes, str):
            object.__setattr__(self, "dtypes", (self.dtypes,))

    schema_type = property(lambda self: "Tensor?" if self.optional else "Tensor")


@dataclass(frozen=True)
class Attr:
    """A scalar attribute (baked into the kernel as an immediate): use Int, Float or Bool."""

    name: str
    kind = "SymInt"     # the torch schema type (SymInt: what custom_op infers for a Python int)
    py = int            # its Python type

    @property
    def schema_type(self):
        return self.kind

    def cast(self, v):
        """The attribute's value as its Python type (prim values and torch scalars come as others)."""
        if self.py is float:
            return float(v)
        if self.py is bool:
            return bool(v)
        if isinstance(v, bool) or int(v) != v:
            raise TypeError(f"attribute {self.name} must be an integer, got {v!r}")
        return int(v)


class Int(Attr):
    kind, py = "SymInt", int


class Float(Attr):
    kind, py = "float", float


class Bool(Attr):
    kind, py = "bool", bool


class Names:
    """Read-only attribute access to a dict: `args.w_h` for args["w_h"]."""

    def __init__(self, values: dict):
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no parameter {name!r} (parameters: {', '.join(self._values)})") from None

    def __setattr__(self, name, value):
        raise AttributeError("operator arguments are read-only")

    def __repr__(self):
        return f"Names({self._values!r})"


# an output rule: (shapes, attrs) -> [(shape, dtype)], shapes/attrs are `Names` by parameter name
# (the shape of an absent optional operand is None). Dims may be ints or symbolic (torch SymInt,
# tvm PrimExpr): rules index and slice them, compare only Python ints.
OutputRule = Callable[[Names, Names], list]


@dataclass(frozen=True)
class OpDef:
    name: str
    params: tuple               # Tensor / Int / Float / Bool, in call order (the torch signature)
    outputs: OutputRule
    reference: str              # the numpy function in tvm_intlstm/reference/ops.py
    doc: str = ""
    n_outputs: int = 1          # how many tensors the op returns (the rule's list length)

    operands = property(lambda self: tuple(p for p in self.params if isinstance(p, Tensor)))
    attrs = property(lambda self: tuple(p for p in self.params if not isinstance(p, Tensor)))

    def __post_init__(self):
        if not self.name.isidentifier():
            raise ValueError(f"op name {self.name!r} is not a Python identifier")
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"op {self.name}: duplicate parameter names {names}")
        seen_optional = False
        for p in self.params:
            if not isinstance(p, (Tensor, Attr)):
                raise TypeError(f"op {self.name}: parameter {p!r} is not a Tensor, Int, Float or Bool")
            if isinstance(p, Tensor):
                bad = [d for d in p.dtypes if d not in INT_DTYPES + ("float32",)]
                if bad or not p.dtypes:
                    raise ValueError(f"op {self.name}: operand {p.name} has unknown dtypes {p.dtypes}")
            optional = isinstance(p, Tensor) and p.optional
            if seen_optional and not optional:
                raise ValueError(f"op {self.name}: required parameter {p.name} after an optional one")
            seen_optional = seen_optional or optional

    @property
    def schema(self) -> str:
        """The torch.library schema, e.g. "(Tensor x, float scale) -> Tensor"."""
        params = ", ".join(f"{p.schema_type} {p.name}" + ("=None" if getattr(p, "optional", False) else "")
                           for p in self.params)
        n = self.n_outputs
        return f"({params}) -> " + ("Tensor" if n == 1 else "(" + ", ".join(["Tensor"] * n) + ")")

    def bind(self, args: tuple, kwargs: Optional[dict] = None) -> dict:
        """{parameter name: value} of a call in the declared order (absent optionals are None)."""
        kwargs = dict(kwargs or {})
        if len(args) > len(self.params):
            raise TypeError(f"intlstm.{self.name} takes {len(self.params)} arguments, got {len(args)}")
        out = {}
        for i, p in enumerate(self.params):
            if i < len(args):
                if p.name in kwargs:
                    raise TypeError(f"intlstm.{self.name}: {p.name} given twice")
                out[p.name] = args[i]
            elif p.name in kwargs:
                out[p.name] = kwargs.pop(p.name)
            elif isinstance(p, Tensor) and p.optional:
                out[p.name] = None
            else:
                raise TypeError(f"intlstm.{self.name}: missing argument {p.name} "
                                f"(signature {self.schema})")
        if kwargs:
            raise TypeError(f"intlstm.{self.name}: unexpected arguments {sorted(kwargs)}")
        return out

    def output_types(self, shapes: dict, attrs: dict) -> list:
        """[(shape tuple, dtype)] of the outputs: the output rule, checked."""
        outs = self.outputs(Names(shapes), Names(attrs))
        if len(outs) != self.n_outputs:
            raise RuntimeError(f"op {self.name}: output rule gave {len(outs)} outputs, declared {self.n_outputs}")
        return [(tuple(s), d) for s, d in outs]

    def check_dtype(self, operand: Tensor, dtype: str) -> None:
        if dtype not in operand.dtypes:
            raise TypeError(f"intlstm.{self.name}: operand {operand.name} must be "
                            f"{' or '.join(operand.dtypes)}, got {dtype}")


OPS: dict[str, OpDef] = {}


def register(op: OpDef) -> OpDef:
    """Declare an operator (its name must be new). The torch op, the importer's converter and the
    reference dispatch follow from the declaration; a lowering is a `_lower_<name>` method of one
    of the passes (tvm_intlstm/passes)."""
    if op.name in OPS:
        raise ValueError(f"operator {op.name!r} is already declared")
    OPS[op.name] = op
    return op


def unregister(name: str) -> None:
    """Remove a declaration (for tests that declare toy operators)."""
    OPS.pop(name, None)


def opdef(name: str) -> OpDef:
    try:
        return OPS[name]
    except KeyError:
        raise KeyError(f"no integer operator {name!r} is declared (declared: {', '.join(OPS)})") from None


def reference_function(name: str) -> Callable:
    """The numpy reference of op `name`, called with the torch op's arguments (numpy arrays)."""
    op = opdef(name)
    fn = getattr(_reference, op.reference, None)
    if fn is None:
        raise AttributeError(f"op {name}: reference function {op.reference!r} is not in tvm_intlstm.reference.ops")
    return fn


class _ReferenceOps:
    """`reference_ops.<name>(...)`: the numpy reference of each declared op, by op name."""

    def __getattr__(self, name):
        return reference_function(name)


reference_ops = _ReferenceOps()


# ---------------------------------------------------------------------------------------------
# output-rule helpers


def int_dtype(bits: int) -> str:
    if bits not in (8, 16):
        raise ValueError(f"requantized outputs are 8 or 16 bits, got out_bits={bits}")
    return f"int{bits}"


def broadcast(a, b) -> tuple:
    """numpy broadcasting of two shapes. A static 1 broadcasts; any other pair of dims must agree,
    and a symbolic dim is taken to equal its partner (the caller's graph guarantees it)."""
    n = max(len(a), len(b))
    a = (1,) * (n - len(a)) + tuple(a)
    b = (1,) * (n - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        if isinstance(y, int) and y == 1:
            out.append(x)
        elif isinstance(x, int) and x == 1:
            out.append(y)
        elif isinstance(x, int) and isinstance(y, int) and x != y:
            raise ValueError(f"shapes {a} and {b} do not broadcast")
        else:
            out.append(x)
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# the operators (docs/integer_spec.md section numbers in the docs)

I8, I16, I32 = "int8", "int16", "int32"
TABLE = I32   # a PWL table packed int32 [3, n+1] (knots; bases; slopes)

register(OpDef(
    "quantize_input", (Tensor("x", "float32"), Float("scale")),
    outputs=lambda s, a: [(s.x, I8)], reference="quantize_input",
    doc="Boundary quantization (spec 1): sat_8(floor(float32(x / s) + 0.5f))."))

register(OpDef(
    "embedding", (Tensor("ids", ("int64", "int32")), Tensor("table", I8)),
    outputs=lambda s, a: [((*s.ids, s.table[1]), I8)], reference="embedding",
    doc="Embedding lookup (spec 6); out-of-range ids raise IndexError."))

register(OpDef(
    "linear_i32", (Tensor("x", I8), Tensor("w", I8), Tensor("b", I32)),
    outputs=lambda s, a: [((*s.x[:-1], s.w[0]), I32)], reference="linear_acc",
    doc="Final linear layer (spec 5): int32 logits W x + b, not requantized."))

register(OpDef(
    "linear_requant",
    (Tensor("x", I8), Tensor("w", I8), Tensor("b", I32), Tensor("m", I32), Tensor("s", I32),
     Int("out_bits")),
    outputs=lambda s, a: [((*s.x[:-1], s.w[0]), int_dtype(a.out_bits))], reference="linear_requant",
    doc="Hidden linear layer (spec 5): requantize_N(W x + b) with per-row multipliers."))

register(OpDef(
    "lstm_direction",
    (Tensor("x", I8), Tensor("w_x", I8), Tensor("w_h", I8), Tensor("bias", I32),
     Tensor("mx", I32), Tensor("sx", I32), Tensor("mh", I32), Tensor("sh", I32),
     Tensor("sig", TABLE), Tensor("tanh", TABLE), Tensor("tanh_c", TABLE),
     Int("mo"), Int("so"), Int("cell_frac"), Bool("reverse"),
     Tensor("h0", I8, optional=True), Tensor("c0", I16, optional=True)),
    outputs=lambda s, a: [((s.x[0], s.x[1], s.w_h[1]), I8), ((s.x[1], s.w_h[1]), I8),
                          ((s.x[1], s.w_h[1]), I16)],
    reference="lstm_direction_op",
    doc="One LSTM direction (spec 8): x int8 [T, B, I] time-major -> (y int8 [T, B, H], "
        "h_T int8 [B, H], c_T int16 [B, H]); h0/c0 default to zeros.", n_outputs=3))

register(OpDef(
    "residual_add", (Tensor("a", I8), Tensor("b", I8), Int("ma"), Int("mb"), Int("s")),
    outputs=lambda s, a: [(broadcast(s.a, s.b), I8)], reference="residual_add",
    doc="8-bit residual add (spec 9)."))

register(OpDef(
    "rescale", (Tensor("x", I8), Int("m"), Int("s")),
    outputs=lambda s, a: [(s.x, I8)], reference="rescale_8",
    doc="int8 -> int8 at another scale (spec 2, rescale_8)."))

register(OpDef(
    "layer_norm", (Tensor("x", I8), Tensor("gamma", I16), Tensor("beta", "int64"), Int("ml"), Int("sl")),
    outputs=lambda s, a: [(s.x, I8)], reference="layer_norm",
    doc="Integer layer norm over the last axis (spec 10)."))

register(OpDef(
    "softmax", (Tensor("z", I32), Int("mz"), Int("sz"), Tensor("exp_table", TABLE)),
    outputs=lambda s, a: [(s.z, I16)], reference="softmax_op",
    doc="Integer softmax over the last axis (spec 11): int32 scores -> int16 Q0.15."))

register(OpDef(
    "attention_context", (Tensor("p", I16), Tensor("v", I8), Int("mc"), Int("sc")),
    outputs=lambda s, a: [((*s.p[:-1], s.v[-1]), I8)], reference="attention_context",
    doc="ctx = requantize_8(sum_k p_k v_kd) (spec 11). p int16 [..., K], v int8 [..., K, D]."))


# --- layer-norm LSTM (spec 8b, 10b) ---------------------------------------------------------------

register(OpDef(
    "ln_lstm_direction",
    (Tensor("x", I8), Tensor("w_x", I8), Tensor("w_h", I8),
     Tensor("mx", I32), Tensor("sx", I32), Tensor("mh", I32), Tensor("sh", I32),
     Tensor("gamma_x", I16), Tensor("beta_x", "int64"), Tensor("gamma_h", I16), Tensor("beta_h", "int64"),
     Tensor("gamma_c", I16), Tensor("beta_c", "int64"),
     Tensor("sig", TABLE), Tensor("tanh", TABLE), Tensor("tanh_c", TABLE),
     Int("mo"), Int("so"), Int("cell_frac"), Bool("reverse"),
     Int("ml_x"), Int("sl_x"), Int("eps_x"), Int("ml_h"), Int("sl_h"), Int("eps_h"),
     Int("ml_c"), Int("sl_c"), Int("eps_c"),
     Tensor("h0", I8, optional=True), Tensor("c0", I16, optional=True)),
    outputs=lambda s, a: [((s.x[0], s.x[1], s.w_h[1]), I8), ((s.x[1], s.w_h[1]), I8),
                          ((s.x[1], s.w_h[1]), I16)],
    reference="ln_lstm_direction_op",
    doc="One layer-norm LSTM direction (spec 8b): x int8 [T, B, I] time-major -> (y int8 [T, B, H], "
        "h_T int8 [B, H], c_T int16 [B, H]); gamma/beta of the input and recurrent layer norms [4H], "
        "of the cell's [H]; h0/c0 default to zeros.", n_outputs=3))


# ---------------------------------------------------------------------------------------------
# attention (issue 18 item 3; docs/integer_spec.md section 11). The unmasked `softmax` and
# `attention_context` above are part of it too.

register(OpDef(
    "attention_dot", (Tensor("q", I8), Tensor("k", I8)),
    outputs=lambda s, a: [((s.q[0], s.q[1], s.k[1]), I32)], reference="attention_dot",
    doc="Luong dot scores (spec 11.1): q int8 [B, Q, D], k int8 [B, S, D] -> int32 [B, Q, S]."))

register(OpDef(
    "additive_scores", (Tensor("qx", I16), Tensor("kx", I16), Tensor("v", I8), Tensor("tanh_table", TABLE)),
    outputs=lambda s, a: [((s.qx[0], s.qx[1], s.kx[1]), I32)], reference="additive_scores",
    doc="Bahdanau scores (spec 11.1): qx int16 Q3.12 [B, Q, A], kx int16 Q3.12 [B, S, A], v int8 [A] "
        "-> int32 [B, Q, S] = v . sat_8(rshift_round(pwl(tanh, add_sat_16(qx, kx)), 8))."))

register(OpDef(
    "masked_softmax",
    (Tensor("z", I32), Tensor("lengths", ("int64", "int32")), Int("mz"), Int("sz"), Tensor("exp_table", TABLE)),
    outputs=lambda s, a: [(s.z, I16)], reference="masked_softmax_op",
    doc="Softmax over the last axis restricted to s < lengths[b] (spec 11.2): z int32 [B, ..., S], "
        "lengths [B] -> int16 Q0.15, 0 at padded positions and in rows of length 0."))

register(OpDef(
    "mha_scores", (Tensor("q", I8), Tensor("k", I8), Int("num_heads")),
    outputs=lambda s, a: [((s.q[0], a.num_heads, s.q[1], s.k[1]), I32)], reference="mha_scores",
    doc="Multi-head dot scores (spec 11.4): q int8 [B, Q, E], k int8 [B, S, E], E = num_heads * dh "
        "-> int32 [B, num_heads, Q, S], z[b, h, i, s] = sum_{d < dh} q[b, i, h dh + d] k[b, s, h dh + d]."))
