"""What Chinchilla approach 3 costs by each `fit_loss` method: `lbfgsb` (one scipy L-BFGS-B run per
grid start, Besiroglu et al.'s method to the letter) and `descend` (the default: vectorised Levenberg-Marquardt from
every start, L-BFGS-B from the best distinct end points), on the default CPU sweep's 19 points and
a synthetic 30-point sweep.

    python -m benchmarks.bench_scaling_fit

Prints one line per sweep and method: wall and CPU seconds, converged runs, the objective and
the fitted parameters (docs/scaling.md quotes them).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from pipeline.scaling import laws

# the default sweep's final val losses (docs/scaling.md, "The default CPU sweep, measured")
DEFAULT_SWEEP = {  # budgets 2.5e10, 5e10, 1e11, 2e11, 4e11 with 4, 3, 3, 4 and 5 sizes
    "N": [16892, 25482, 34168, 51828, 25482, 34168, 51828, 34168, 51828, 69872, 51828, 69872, 107112, 145888,
          69872, 107112, 145888, 228048, 316352],
    "D": [246656, 163456, 121984, 80384, 327040, 243840, 160768, 487808, 321536, 238592, 643200, 477056, 311168,
          228480, 954112, 622464, 456960, 292352, 210688],
    "loss": [5.7767, 5.5372, 5.5503, 5.8098, 5.3637, 5.2323, 5.2142, 5.1604, 4.9804, 5.0032, 4.9286, 4.8753, 4.8379,
          4.8443, 4.7967, 4.6892, 4.6312, 4.9341, 5.0647],
}
PLANTED = {"E": 1.8, "A": 400.0, "B": 1200.0, "alpha": 0.34, "beta": 0.30}


def synthetic_sweep(budgets: int = 6, sizes: int = 5, noise: float = 0.002, seed: int = 0) -> dict[str, np.ndarray]:
    """An IsoFLOP design around Chinchilla's sqrt(C / 120), losses from PLANTED with log-normal noise."""
    C = np.repeat(np.logspace(17, 19.5, budgets), sizes)
    N = C ** 0.5 / math.sqrt(120) * np.tile(np.logspace(-0.6, 0.6, sizes), budgets)
    D = C / (6 * N)
    loss = laws.predict(PLANTED, N, D) * np.exp(np.random.default_rng(seed).normal(0.0, noise, len(N)))
    return {"N": N, "D": D, "loss": loss}


def timed(f):
    wall, cpu = time.perf_counter(), time.process_time()
    out = f()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    for name, sweep in {"default 19-point": DEFAULT_SWEEP, "synthetic 30-point": synthetic_sweep()}.items():
        N, D, loss = (np.asarray(sweep[k], dtype=np.float64) for k in ("N", "D", "loss"))
        for method in laws.METHODS:
            found, wall, cpu = timed(lambda: laws.fit_loss(N, D, loss, method=method))
            print(f"{name} | {method}: L-BFGS-B from {found['polished']} of {found['grid_starts']} starts "
                  f"({found['converged_starts']} converged) | {wall:.1f} s | {cpu:.1f} CPU-s | "
                  f"{found['objective']:.6g} | " + ", ".join(f"{k} {found[k]:.4g}" for k in laws.PARAMS), flush=True)


if __name__ == "__main__":
    main()
