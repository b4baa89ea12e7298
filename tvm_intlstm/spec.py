"""The fixed formats of docs/integer_spec.md, defined once.

The numpy reference (reference/ops.py), the PyTorch integer ops (nn/intops.py) and the TIR kernels
(kernels/) import these; tests/test_spec_constants.py checks that none of them defines its own.
No imports: the reference loads without torch or tvm.
"""
INT8 = (-128, 127)
INT16 = (-32768, 32767)
INT32 = (-(2**31), 2**31 - 1)

PWL_FRAC = 14         # spec 7: PWL slopes are Q.14 (v + rshift_round(a (x - k), 14))
GATE_FRAC = 12        # spec 8: the int16 gate domain is Q3.12
LN_FRAC = 12          # spec 10: the normalized value before gamma is Q.12
SOFTMAX_IN_FRAC = 10  # spec 11: the shifted scores enter the exp table as Q.10
PROB_FRAC = 15        # spec 11: probabilities are int16 Q0.15
LN16_MAX_EPS = 2**46  # spec 10b: the layer norm's epsilon E is in [0, 2^46)
