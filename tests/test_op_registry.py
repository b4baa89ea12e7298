"""The operator declarations (tvm_intlstm/opdefs.py) and the layer registry (quant/layers.py): every
declared op has its torch op, importer converter, lowering and numpy reference; the fake (shape)
implementation agrees with the real one; the numpy reference agrees with the torch op bit for bit;
a toy op and a toy layer declared here flow to every place that reads the registries."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from tvm_intlstm import opdefs
from tvm_intlstm.nn import intops
from tvm_intlstm.opdefs import OPS, Bool, Int, OpDef, Tensor
from tvm_intlstm.quant import fixed_point as fp
from tvm_intlstm.quant.pwl import fit_pwl

# declared ops without a lowering yet (none: attention is lowered by passes/lower_attention.py).
# An op declared before its lowering must be listed here (the test checks the set exactly).
NOT_LOWERED_YET = set()

rng = np.random.default_rng(15)


def _i(lo, hi, shape, dtype):
    return torch.from_numpy(rng.integers(lo, hi, size=shape).astype(dtype))


def _lstm_case(T=5, B=3, I=6, H=4, states=False, reverse=False):
    cf = 11
    mx, sx = fp.quantize_multiplier_array(rng.uniform(1e-2, 5e-2, 4 * H))
    mh, sh = fp.quantize_multiplier_array(rng.uniform(1e-2, 5e-2, 4 * H))
    mo, so = fp.quantize_multiplier(2**-30 * 127)
    args = [_i(-128, 128, (T, B, I), np.int8), _i(-127, 128, (4 * H, I), np.int8),
            _i(-127, 128, (4 * H, H), np.int8), _i(-3000, 3000, 4 * H, np.int32),
            torch.from_numpy(mx), torch.from_numpy(sx), torch.from_numpy(mh), torch.from_numpy(sh),
            intops.pack_table(fit_pwl("sigmoid", 16, 12)), intops.pack_table(fit_pwl("tanh", 16, 12)),
            intops.pack_table(fit_pwl("tanh", 16, cf)), mo, so, cf, reverse]
    if states:
        args += [_i(-128, 128, (B, H), np.int8), _i(-2**15, 2**15, (B, H), np.int16)]
    return args


def _ln_lstm_case(T=4, B=2, I=5, H=3, states=False, reverse=False):
    mx, sx = fp.quantize_multiplier_array(rng.uniform(1e-2, 5e-2, 4 * H))
    mh, sh = fp.quantize_multiplier_array(rng.uniform(1e-2, 5e-2, 4 * H))
    mo, so = fp.quantize_multiplier(2**-30 * 127)
    ml, sl = fp.quantize_multiplier15(3e-5)

    def ln(D):
        return [_i(-2**15, 2**15, D, np.int16), _i(-2**30, 2**30, D, np.int64)]

    t = [intops.pack_table(fit_pwl(f, 16, 12)) for f in ("sigmoid", "tanh", "tanh")]
    args = ([_i(-128, 128, (T, B, I), np.int8), _i(-127, 128, (4 * H, I), np.int8),
             _i(-127, 128, (4 * H, H), np.int8)] + [torch.from_numpy(v) for v in (mx, sx, mh, sh)]
            + ln(4 * H) + ln(4 * H) + ln(H) + t + [mo, so, 11, reverse, ml, sl, 3, ml, sl, 0, ml, sl, 9])
    if states:
        args += [_i(-128, 128, (B, H), np.int8), _i(-2**15, 2**15, (B, H), np.int16)]
    return args


def _cases():
    """Valid example arguments of every declared op (one or more cases each)."""
    m5, s5 = fp.quantize_multiplier_array(rng.uniform(1e-4, 1e-3, 5))
    mz, sz = fp.quantize_multiplier(0.003 / 2**-10)
    mc, sc = fp.quantize_multiplier(2**-15)
    x8 = _i(-128, 128, (2, 3, 6), np.int8)
    return {
        "quantize_input": [[torch.randn(2, 3, 5), 0.05]],
        "embedding": [[_i(0, 10, (2, 3), np.int64), _i(-127, 128, (10, 4), np.int8)]],
        "linear_i32": [[x8, _i(-127, 128, (5, 6), np.int8), _i(-1000, 1000, 5, np.int32)]],
        "linear_requant": [[x8, _i(-127, 128, (5, 6), np.int8), _i(-1000, 1000, 5, np.int32),
                            torch.from_numpy(m5), torch.from_numpy(s5), bits] for bits in (8, 16)],
        "lstm_direction": [_lstm_case(), _lstm_case(states=True, reverse=True)],
        "ln_lstm_direction": [_ln_lstm_case(), _ln_lstm_case(states=True, reverse=True)],
        "residual_add": [[x8, _i(-128, 128, (2, 3, 6), np.int8), 3 << 10, 5 << 10, 13],
                         [x8, _i(-128, 128, (1, 6), np.int8), 3 << 10, 5 << 10, 13]],   # broadcast
        "rescale": [[x8, *fp.quantize_multiplier(0.7)]],
        "layer_norm": [[_i(-128, 128, (2, 3, 8), np.int8), _i(-2**14, 2**14, 8, np.int16),
                        _i(-2**20, 2**20, 8, np.int64), 20000, 24]],
        "softmax": [[_i(-3000, 3000, (2, 3, 7), np.int32), mz, sz, intops.pack_table(fit_pwl("exp", 16, 10))]],
        "attention_context": [[_i(0, 2**15, (3, 7), np.int16), _i(-128, 128, (3, 7, 5), np.int8), mc, sc]],
    }


CASES = _cases()


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def test_every_declared_op_has_all_its_parts():
    from tvm_intlstm.frontend.importer import convert_map
    from tvm_intlstm.passes._lowering import LOWERINGS
    import tvm_intlstm.passes  # noqa: F401  (the passes register their lowerings)

    assert set(CASES) == set(OPS), "every declared op needs an example case in this test"
    converters = convert_map()
    for name, op in OPS.items():
        assert str(getattr(torch.ops.intlstm, name).default._schema) == f"intlstm::{name}{op.schema}"
        assert f"{name}.default" in converters
        ref = opdefs.reference_function(name)
        inspect.signature(ref).bind(*(p.name for p in op.params))   # takes the op's arguments
    assert set(OPS) - set(LOWERINGS) == NOT_LOWERED_YET


@pytest.mark.parametrize("name", sorted(CASES))
def test_fake_and_reference_agree_with_the_torch_op(name):
    torch_op = getattr(torch.ops.intlstm, name)
    for args in CASES[name]:
        real = _as_tuple(torch_op(*args))
        with FakeTensorMode(allow_non_fake_inputs=False) as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = _as_tuple(torch_op(*fake_args))
        assert [(tuple(f.shape), f.dtype) for f in fake] == [(tuple(r.shape), r.dtype) for r in real]
        ref = _as_tuple(opdefs.reference_function(name)(
            *(a.numpy() if isinstance(a, torch.Tensor) else a for a in args)))
        assert len(ref) == len(real)
        for r, want in zip(ref, real):
            assert r.dtype == want.numpy().dtype
            np.testing.assert_array_equal(r, want.numpy())


def test_fake_refuses_an_undeclared_dtype():
    x, w, b = CASES["linear_i32"][0]
    w = w.to(torch.int16)
    with FakeTensorMode() as mode:
        with pytest.raises(TypeError, match="operand w must be int8, got int16"):
            torch.ops.intlstm.linear_i32(mode.from_tensor(x), mode.from_tensor(w),
                                         mode.from_tensor(b))


def test_bad_declarations_are_refused():
    with pytest.raises(ValueError, match="after an optional"):
        OpDef("bad", (Tensor("x", "int8", optional=True), Int("k")), outputs=lambda s, a: [], reference="x")
    with pytest.raises(ValueError, match="duplicate"):
        OpDef("bad", (Tensor("x", "int8"), Int("x")), outputs=lambda s, a: [], reference="x")
    with pytest.raises(ValueError, match="unknown dtypes"):
        OpDef("bad", (Tensor("x", "int4"),), outputs=lambda s, a: [], reference="x")
    with pytest.raises(ValueError, match="already declared"):
        opdefs.register(OPS["rescale"])
    with pytest.raises(KeyError, match="no integer operator 'nope'"):
        opdefs.opdef("nope")
    with pytest.raises(TypeError, match="missing argument scale"):
        OPS["quantize_input"].bind((torch.zeros(1),))


def _toy_impl(x: torch.Tensor, k: int, flip: bool, y=None, z=None) -> torch.Tensor:
    out = x.to(torch.int16) * k
    for extra in (y, z):
        if extra is not None:
            out = out + extra.to(torch.int16)
    return -out if flip else out


@pytest.fixture
def toy_op():
    """A toy operator declared and registered here, removed from the declarations afterwards (the
    torch op stays registered: torch.library has no removal; the name is unique to this test)."""
    op = OpDef("toy_scale_i16", (Tensor("x", "int8"), Int("k"), Bool("flip"),
                                 Tensor("y", "int8", optional=True), Tensor("z", "int8", optional=True)),
               outputs=lambda s, a: [(s.x, "int16")], reference="toy_scale_i16")
    opdefs.register(op)
    if not hasattr(torch.ops.intlstm, op.name):
        intops.register_op(op, _toy_impl)
    yield op
    opdefs.unregister(op.name)


def _placeholders(mod):
    from tvm import relax
    from tvm_intlstm.frontend.importer import op_args
    found = []
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            for block in func.body.blocks:
                for binding in block.bindings:
                    hit = op_args(binding.value)
                    if hit is not None:
                        found.append((hit, binding.value))
    return found


def test_a_declared_toy_op_reaches_torch_the_importer_and_op_args(toy_op):
    from torch.export import Dim, export
    from tvm.relax.frontend.torch import from_exported_program
    from tvm_intlstm.frontend.importer import convert_map

    x = _i(-128, 128, (4, 3), np.int8)
    z = _i(-128, 128, (4, 3), np.int8)
    np.testing.assert_array_equal(torch.ops.intlstm.toy_scale_i16(x, 3, True, None, z).numpy(),
                                  -(x.numpy().astype(np.int16) * 3 + z.numpy()))
    assert "toy_scale_i16.default" in convert_map()

    class UsesToy(nn.Module):
        def forward(self, x, z):
            a = torch.ops.intlstm.toy_scale_i16(x, 3, False)            # no optional operand
            b = torch.ops.intlstm.toy_scale_i16(x, 5, True, None, z)    # z present, y absent
            return a, b

    batch = Dim("batch", min=1)
    ep = export(UsesToy(), (x, z), dynamic_shapes=({0: batch}, {0: batch}))
    mod = from_exported_program(ep, custom_convert_map=convert_map())
    calls = _placeholders(mod)
    assert [name for (name, _), _ in calls] == ["toy_scale_i16"] * 2
    (_, a), call_a = calls[0]
    (_, b), call_b = calls[1]
    assert (a.k, a.flip, a.y, a.z) == (3, False, None, None) and b.k == 5 and b.flip is True
    assert b.y is None and b.z is not None
    assert len(call_a.args[1].fields) == 3      # x, then the two attributes: trailing absents left out
    assert len(call_b.args[1].fields) == 5      # x, () for the absent y, z, the two attributes
    out = call_b.ty      # the output rule on the symbolic batch dim: (batch, 3) int16
    (n, f), (nx, _) = out.shape.values, call_b.args[1].fields[0].ty.shape.values
    assert str(out.dtype) == "int16" and n.same_as(nx) and not isinstance(n, int) and int(f) == 3
    with pytest.raises(AttributeError, match="no parameter 'w'"):
        a.w


# ---------------------------------------------------------------------------------------------
# layers


def test_every_integer_module_is_a_registered_layer():
    from tvm_intlstm.nn import intmodules as im
    from tvm_intlstm.quant import layers, serialize

    def subclasses(c):
        return set(c.__subclasses__()).union(*(subclasses(s) for s in c.__subclasses__()))

    assert subclasses(im.IntModule) <= set(layers.int_types())
    assert set(serialize._module_classes().values()) == set(layers.int_types())
    for lay in layers.LAYERS:
        assert callable(lay.reference)
        assert lay.qat_type is not None or lay.int_type is nn.Identity, lay.int_type
        for t in lay.float_types:
            assert layers.for_float(t.__new__(t)) is lay
    with pytest.raises(ValueError, match="already registered"):
        layers.register_layer(layers.LAYERS[0])


class Halve(nn.Module):
    """A toy float layer the quantizer does not know."""

    def forward(self, x):
        return x * 0.5


class HalveNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.halve, self.fc2 = nn.Linear(6, 8), Halve(), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.halve(self.fc1(x)))


def _toy_layer():
    from tvm_intlstm.nn import intmodules as im
    from tvm_intlstm.nn.modules import QuantModule, RangeObserver
    from tvm_intlstm.nn.fake_quant import fake_quant
    from tvm_intlstm.opdefs import reference_ops as R
    from tvm_intlstm.quant import layers

    class IntHalve(im.IntModule):
        def __init__(self, m, s, out_scale):
            super().__init__()
            self.m, self.s, self.out_scale = int(m), int(s), float(out_scale)

        def forward(self, x):
            return torch.ops.intlstm.rescale(x, self.m, self.s)

    class QuantHalve(QuantModule):
        def __init__(self, config):
            super().__init__(config)
            self.obs = RangeObserver()

        def forward_observe(self, x):
            self.obs.update(x * 0.5)
            return x * 0.5

        def forward_fake(self, x):
            return fake_quant(x * 0.5, self.obs.scale(), -128, 127)

        def to_int(self, in_scales):
            s_y = self.obs.scale()
            return IntHalve(*fp.quantize_multiplier(in_scales[0] * 0.5 / s_y), s_y)

    return layers.Layer(IntHalve, float_types=(Halve,), qat_type=QuantHalve,
                        prepare=lambda mod, call: QuantHalve(call.config),
                        reference=lambda mod, a: R.rescale(a[0], mod.m, mod.s), describe="Halve")


def test_a_registered_toy_layer_is_quantized_saved_and_referenced(tmp_path):
    import tvm_intlstm as til
    from tvm_intlstm.quant import layers

    model = HalveNet().eval()
    calib = [torch.randn(4, 6) for _ in range(3)]
    with pytest.raises(til.UnsupportedModelError, match="unsupported operation mul"):   # traced into
        til.quantize(model, calib)
    layer = layers.register_layer(_toy_layer())
    try:
        q = til.quantize(model, calib)
        assert type(q.gm.get_submodule("halve")).__name__ == "IntHalve"
        x = torch.randn(5, 6)
        np.testing.assert_array_equal(q(x).numpy(), til.reference(q)(x.numpy()))
        path = til.save_quantized(q, tmp_path / "halve.pt")
        np.testing.assert_array_equal(til.load_quantized(path)(x).numpy(), q(x).numpy())
    finally:
        layers.unregister_layer(layer.int_type)
    # unregistered, its class is no longer on the model file's allow-list
    with pytest.raises(ValueError, match="unknown module type 'IntHalve'"):
        til.load_quantized(path)


def test_lstm_initial_states_reach_the_placeholder_by_name():
    """h0/c0 (optional operands) survive export and import as named arguments, and the lowering
    takes them."""
    from torch.export import export
    from tvm.relax.frontend.torch import from_exported_program
    from tvm_intlstm.frontend.importer import convert_map
    from tvm_intlstm.passes import LowerLSTM
    from tvm_intlstm.target import parse_target

    args = _lstm_case(states=True)
    tensors, scalars = args[:11] + args[15:], args[11:15]

    class Direction(nn.Module):
        def forward(self, x, h0, c0):
            return torch.ops.intlstm.lstm_direction(x, *tensors[1:11], *scalars, h0, c0)

    ep = export(Direction(), (tensors[0], *tensors[11:]))
    mod = from_exported_program(ep, custom_convert_map=convert_map())
    ((name, a), _), = _placeholders(mod)
    assert name == "lstm_direction" and a.h0 is not None and a.c0 is not None
    assert (a.mo, a.so, a.cell_frac, a.reverse) == (scalars[0], scalars[1], scalars[2], False)
    assert [int(d) for d in a.c0.ty.shape.values] == [3, 4] and str(a.c0.ty.dtype) == "int16"
    # the lowering reads them by name and takes the init-state kernel (docs/stateful.md)
    lowered = LowerLSTM(parse_target("host"))(mod)
    assert not _placeholders(lowered) and "lstm_recurrent" in lowered.script(show_meta=False)


# attention ops (issue 18 item 3; tests/test_attention_ops.py has their own tests)
def _attention_cases():
    mz, sz = fp.quantize_multiplier(0.003 / 2**-10)
    return {
        "attention_dot": [[_i(-128, 128, (2, 3, 5), np.int8), _i(-128, 128, (2, 7, 5), np.int8)]],
        "additive_scores": [[_i(-2**15, 2**15, (2, 3, 5), np.int16), _i(-2**15, 2**15, (2, 7, 5), np.int16),
                             _i(-127, 128, 5, np.int8), intops.pack_table(fit_pwl("tanh", 16, 12))]],
        "masked_softmax": [[_i(-3000, 3000, (3, 2, 7), np.int32), torch.tensor([0, 7, 3]), mz, sz,
                            intops.pack_table(fit_pwl("exp", 16, 10))],
                           [_i(-3000, 3000, (2, 5), np.int32), torch.tensor([1, 9], dtype=torch.int32), mz, sz,
                            intops.pack_table(fit_pwl("exp", 16, 10))]],
        "mha_scores": [[_i(-128, 128, (2, 3, 8), np.int8), _i(-128, 128, (2, 7, 8), np.int8), heads]
                       for heads in (1, 2, 4)],
    }


CASES.update(_attention_cases())
