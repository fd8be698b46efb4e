"""Built-in synthetic datasets, generated from a seed. No torch: numpy arrays in, numpy arrays out."""

from __future__ import annotations

import numpy as np

from ddptrain.errors import UsageError

BUILTIN = ("xor", "spirals", "moons", "blobs", "regression")


def generate(name: str, n: int, seed: int, n_features: int | None = None, n_classes: int | None = None,
             noise: float | None = None, problem_seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features [n, F] float64 and a target: int class ids (classification) or float values (regression).

    `problem_seed` fixes the problem itself (the blobs' centres, the regression's weights; the others are fixed
    shapes) and `seed` the rows drawn from it, so a fresh sample for evaluation (another `seed`) poses the problem
    the model was trained on. It defaults to `seed`."""
    if name not in BUILTIN:
        raise UsageError(f"unknown dataset '{name}': not a file path nor one of the built-ins "
                         f"({', '.join(BUILTIN)})")
    rng = np.random.default_rng(seed)
    problem = np.random.default_rng([seed if problem_seed is None else problem_seed, 1])
    two_d = name in ("xor", "spirals", "moons")
    if two_d and n_features not in (None, 2):
        raise UsageError(f"--n-features {n_features}: '{name}' is two-dimensional; drop --n-features")
    if name in ("xor", "moons") and n_classes not in (None, 2):
        raise UsageError(f"--n-classes {n_classes}: '{name}' has two classes; drop --n-classes")
    if name == "xor":
        x = rng.uniform(-1.0, 1.0, size=(n, 2))
        y = (x[:, 0] * x[:, 1] > 0).astype(np.int64)
        return x + rng.normal(0.0, noise or 0.0, size=x.shape), y
    if name == "spirals":
        k = n_classes or 2
        y = rng.integers(0, k, size=n)
        t = np.sqrt(rng.uniform(0.0, 1.0, size=n))
        angle = 3.0 * np.pi * t + 2.0 * np.pi * y / k
        x = np.stack([t * np.cos(angle), t * np.sin(angle)], axis=1)
        return x + rng.normal(0.0, 0.03 if noise is None else noise, size=x.shape), y
    if name == "moons":
        y = rng.integers(0, 2, size=n)
        angle = rng.uniform(0.0, np.pi, size=n)
        x = np.where(y[:, None] == 0,
                     np.stack([np.cos(angle), np.sin(angle)], axis=1),
                     np.stack([1.0 - np.cos(angle), 0.5 - np.sin(angle)], axis=1))
        return x + rng.normal(0.0, 0.1 if noise is None else noise, size=x.shape), y
    if name == "blobs":
        k, f = n_classes or 3, n_features or 2
        centers = problem.normal(0.0, 3.0, size=(k, f))
        y = rng.integers(0, k, size=n)
        return centers[y] + rng.normal(0.0, 1.0 if noise is None else noise, size=(n, f)), y
    f = n_features or 8
    if n_classes is not None:
        raise UsageError("--n-classes: 'regression' has a continuous target; drop --n-classes")
    x = rng.normal(0.0, 1.0, size=(n, f))
    weights = problem.normal(0.0, 1.0, size=f)
    signal = x @ weights + 2.0 * np.sin(2.0 * x[:, 0]) + x[:, min(1, f - 1)] ** 2
    y = 50.0 + 10.0 * (signal + rng.normal(0.0, 0.1 if noise is None else noise, size=n))
    return x, y
