"""Convert an nn.LSTM's weights to a full-int8 LiteRT (.tflite) model: integer-only LSTM (int8
weights and activations, int16 cell state, TFLite's fused UNIDIRECTIONAL_SEQUENCE_LSTM).

Helper of benchmarks/peers.py. It needs TensorFlow and tf-keras (Keras 2, whose LSTM the TFLite
converter fuses into one LSTM op), which tvm_intlstm does not depend on: run it with the Python of a
separate environment, e.g.

    python3.11 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu tf-keras
    /tmp/tfvenv/bin/python benchmarks/litert_convert.py weights.npz calib.npy out_b{batch}.tflite \
        --batch 1 --batch 8          # one model per batch size ({batch} in the output name)

weights.npz: for each layer l, w_ih{l} (4H, I), w_hh{l} (4H, H), b{l} (4H,) = b_ih + b_hh (PyTorch's
layout; the gate order i, f, g, o is also Keras's). calib.npy: float32 (N, T, I) batch-major
calibration sequences. The model takes float32 (B, T, I) batch-major and returns float32 (B, T, H);
inside it everything is int8/int16 (quantize at the input, dequantize at the output).

Known problem (TensorFlow 2.21, tf-keras 2.21): a 1-layer LSTM converts well (relative error against
PyTorch FP32 ~0.017 at 256->512 and 650->650), the float .tflite of the 2-layer 650 model is exact,
but its full-int8 version gives a wrong output (relative error ~4.7): the stacked LSTM's int8
quantization, not investigated further. The benchmark still times it (same operations).
"""
import argparse
import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def convert(weights, calib, batch):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    n_layers = sum(1 for k in weights if k.startswith("w_ih"))
    T, I = calib.shape[1], calib.shape[2]
    inp = tf.keras.Input(shape=(T, I), batch_size=batch, dtype=tf.float32)
    h = inp
    layers = []
    for l in range(n_layers):
        H = weights[f"w_hh{l}"].shape[1]
        lstm = tf.keras.layers.LSTM(H, return_sequences=True)
        h = lstm(h)
        layers.append(lstm)
    model = tf.keras.Model(inp, h)
    for l, lstm in enumerate(layers):
        lstm.set_weights([weights[f"w_ih{l}"].T, weights[f"w_hh{l}"].T, weights[f"b{l}"]])

    def representative():
        for i in range(0, len(calib) - batch + 1, batch):
            yield [calib[i:i + batch]]

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return conv.convert(), model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("weights")
    ap.add_argument("calib")
    ap.add_argument("out")
    ap.add_argument("--batch", type=int, action="append", help="batch size (repeatable); default 1")
    a = ap.parse_args()
    w = dict(np.load(a.weights))
    calib = np.load(a.calib).astype(np.float32)
    for b in a.batch or [1]:
        flat, _ = convert(w, calib, b)
        out = a.out.replace("{batch}", str(b))
        with open(out, "wb") as f:
            f.write(flat)
        print(f"wrote {out} ({len(flat)} bytes)", flush=True)


if __name__ == "__main__":
    main()
