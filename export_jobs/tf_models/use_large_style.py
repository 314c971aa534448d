"""A small model with the string-op set of USE large v5, random weights (fixed seed).

Graph: StaticRegexReplace clean-up -> StringSplit (delimiter " ", skip_empty) -> vocabulary lookup
with OOV hash buckets (LookupTableFindV2 / LookupTableSizeV2 / StringToHashBucketFast)
-> SparseFillEmptyRows -> sparse segment mean of embeddings -> two dense layers
-> L2 norm. No StringLower: tf2onnx turns it into ONNX StringNormalizer, which
fails to load where the en_US.UTF-8 locale is absent. Imports TensorFlow: run only
in a process that never loads onnxruntime-extensions.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tensorflow as tf

SEED = 20261127
EMBED_DIM = 64
HIDDEN_DIM = 256
OUTPUT_DIM = 512
NUM_OOV_BUCKETS = 32
EMPTY_ROW_TOKEN = "<empty>"  # what SparseFillEmptyRows puts in a text with no words

_WORDS = """the a of and to in is it you that he was for on are with as I his they be at one
have this from or had by hot word but what some we can out other were all there when up use
der die das und ist nicht ein eine ich du wir sie mit auf für von zu
le la les et est un une je tu nous vous il elle pas de du
и в не на я что он с как это мир привет
的 是 我 你 他 在 有 这 个 们 中 来 上 大
は が を に の で と も た
في من على إلى هذا أن مرحبا""".split()


def vocabulary() -> list[str]:
    """Deterministic word list: a reserved row for empty texts, then the words."""
    return [EMPTY_ROW_TOKEN] + list(dict.fromkeys(_WORDS))


def _weights(vocab_size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    rows = vocab_size + NUM_OOV_BUCKETS

    def dense(n_in, n_out):
        return rng.normal(0.0, 1.0 / np.sqrt(n_in), (n_in, n_out)).astype(np.float32)

    return {
        "embedding": rng.normal(0.0, 1.0, (rows, EMBED_DIM)).astype(np.float32),
        "w1": dense(EMBED_DIM, HIDDEN_DIM), "b1": rng.normal(0.0, 0.1, HIDDEN_DIM).astype(np.float32),
        "w2": dense(HIDDEN_DIM, OUTPUT_DIM), "b2": rng.normal(0.0, 0.1, OUTPUT_DIM).astype(np.float32),
    }


class UseLargeStyle(tf.Module):
    def __init__(self, vocab: list[str]):
        super().__init__()
        init = tf.lookup.KeyValueTensorInitializer(
            tf.constant(vocab), tf.range(len(vocab), dtype=tf.int64))
        self.table = tf.lookup.StaticVocabularyTable(init, num_oov_buckets=NUM_OOV_BUCKETS)
        self.empty_row_id = vocab.index(EMPTY_ROW_TOKEN)
        for name, value in _weights(len(vocab)).items():
            setattr(self, name, tf.Variable(value, trainable=False, name=name))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def serve(self, inputs):
        text = tf.strings.regex_replace(inputs, r"[[:punct:]]+", " ")
        text = tf.strings.regex_replace(text, r"\s+", " ")
        text = tf.strings.regex_replace(text, r"^ | $", "")
        # StringSplit (v1, as in USE large v5) with skip_empty: TF's StringSplitV2 turns ""
        # into one empty word where the extensions' StringSplit gives none. Its sparse
        # output also avoids a ragged round trip, whose conversion divides by the longest
        # row (0 for a batch of empty texts). Always pass a separator: without one the
        # converted graph splits into characters.
        words = tf.compat.v1.string_split(text, delimiter=" ", skip_empty=True)
        ids = tf.SparseTensor(words.indices, self.table.lookup(words.values), words.dense_shape)
        ids, _ = tf.sparse.fill_empty_rows(ids, tf.constant(self.empty_row_id, tf.int64))
        pooled = tf.sparse.segment_mean(
            self.embedding, ids.values, ids.indices[:, 0], num_segments=tf.shape(inputs)[0])
        hidden = tf.tanh(tf.matmul(pooled, self.w1) + self.b1)
        out = tf.matmul(hidden, self.w2) + self.b2
        return {"outputs": tf.math.l2_normalize(out, axis=1)}


def build(out_dir: str | os.PathLike) -> Path:
    """Write the SavedModel (signature serving_default: inputs -> outputs) to out_dir."""
    model = UseLargeStyle(vocabulary())
    out = Path(out_dir)
    tf.saved_model.save(model, str(out), signatures={"serving_default": model.serve})
    return out
