"""Parity gate: an export proves itself against its source framework or is refused.

Typed errors say what failed; the measured figures go into the manifest.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


class ExportError(RuntimeError):
    """Any failure that must keep an export out of the manifest."""


class ShapeError(ExportError):
    def __init__(self, what: str, expected: tuple[int, ...], actual: tuple[int, ...]):
        super().__init__(f"{what}: shape {actual} from ONNX Runtime, {expected} from the source model")
        self.what, self.expected, self.actual = what, expected, actual


class ParityError(ExportError):
    def __init__(self, what: str, max_abs_diff: float, tolerance: float):
        super().__init__(f"{what}: max abs difference {max_abs_diff:.3g} exceeds tolerance {tolerance:.3g}")
        self.what, self.max_abs_diff, self.tolerance = what, max_abs_diff, tolerance


class CosineError(ExportError):
    def __init__(self, what: str, cosine: float, minimum: float):
        super().__init__(f"{what}: min cosine {cosine:.6f} to the source model is below {minimum}")
        self.what, self.cosine, self.minimum = what, cosine, minimum


def max_abs_diff(what: str, expected: np.ndarray, actual: np.ndarray) -> float:
    expected, actual = np.asarray(expected), np.asarray(actual)
    if expected.shape != actual.shape:
        raise ShapeError(what, expected.shape, actual.shape)
    if not np.all(np.isfinite(actual)):
        return float("inf")
    return float(np.max(np.abs(expected.astype(np.float64) - actual.astype(np.float64)), initial=0.0))


def check(what: str, expected: np.ndarray, actual: np.ndarray, tolerance: float) -> float:
    diff = max_abs_diff(what, expected, actual)
    if not diff <= tolerance:  # also refuses NaN
        raise ParityError(what, diff, tolerance)
    return diff


def min_cosine(expected: np.ndarray, actual: np.ndarray) -> float:
    a = expected.reshape(len(expected), -1).astype(np.float64)
    b = actual.reshape(len(actual), -1).astype(np.float64)
    num = np.sum(a * b, axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min(num / np.maximum(den, 1e-12)))


def worst(diffs: Sequence[float]) -> float:
    return float(max(diffs)) if diffs else 0.0
