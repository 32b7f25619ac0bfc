"""LLM.int8's outlier columns at random init: the one rule (no torch).

bitsandbytes' ``MatMul8bitLt`` routes every input column with an ``|x| >= 6`` entry
(``llm_int8_threshold``) through fp16 and keeps that ``subA`` copy for backward. Which
columns carry one depends on the values; for the random-init models the harness trains,
only the MLP output projections see such inputs (``act(gate) * up``, or ``act(x)``), and
``outlier_probability`` gives the chance for one element. The step trace (``fakemodel``),
the op trace (``optrace``) and the recipe trace (``recipe``) all read the columns from here.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

# bitsandbytes' LLM.int8 outlier threshold (BitsAndBytesConfig.llm_int8_threshold default)
INT8_THRESHOLD = 6.0
# MLP output projections whose input is act(gate) * up (gated) or act(x): where random-init
# models put |x| >= 6 entries
MLP_OUTPUT = {"down_proj": True, "fc2": False}


class OutlierRule(NamedTuple):
    """What the outlier columns of one MLP output projection depend on, but the tokens."""

    act: str  # silu, gelu_tanh or relu
    sigma: float  # the std of the gate / up outputs: initializer_range * sqrt(hidden)
    gated: bool
    in_features: int

    def columns(self, tokens: int) -> int:
        """Columns of the ``tokens`` x ``in_features`` input with at least one |x| >= 6 (rows
        treated as independent)."""
        return int8_outlier_columns(self.act, self.sigma, self.gated, self.in_features, tokens)


def outlier_rule(config: Any, name: str, in_features: int) -> OutlierRule | None:
    """The rule of the int8 linear called ``name`` (a module path; peft's ``base_layer``
    allowed), None for a linear that sees no outliers."""
    parts = name.split(".")
    leaf = parts[-2] if parts[-1] == "base_layer" and len(parts) > 1 else parts[-1]
    if leaf not in MLP_OUTPUT:
        return None
    act = str(
        getattr(config, "hidden_activation", None)
        or getattr(config, "hidden_act", None)
        or getattr(config, "activation_function", None)
        or "silu"
    )
    act = "gelu_tanh" if "gelu" in act else ("relu" if act == "relu" else "silu")
    sigma = float(getattr(config, "initializer_range", 0.02) or 0.02) * math.sqrt(
        int(config.hidden_size)
    )
    return OutlierRule(act, sigma, MLP_OUTPUT[leaf], int(in_features))


def _act(name: str, x: float) -> float:
    if name == "relu":
        return max(x, 0.0)
    if name in ("gelu_tanh", "gelu"):
        return 0.5 * x * (1.0 + math.tanh(0.7978845608028654 * (x + 0.044715 * x**3)))
    return x / (1.0 + math.exp(-x))  # silu


def int8_outlier_probability(act: str, sigma: float, gated: bool) -> float:
    """P(|x| >= 6) for one element of an MLP output projection's input at random init.

    The input of ``down_proj`` is ``act(g) * u`` (``act(g)`` without a gate), with g and u
    the gate / up outputs: sums over ``hidden`` normalized inputs (~N(0, 1) after RMSNorm)
    times weights drawn N(0, initializer_range^2), so ~N(0, sigma^2) with
    sigma = initializer_range * sqrt(hidden), independent of each other. Integrated
    numerically over g (Simpson, +-12 sigma).
    """

    def tail(z: float) -> float:  # P(|N(0,1)| >= z)
        return math.erfc(z / math.sqrt(2.0))

    steps = 2400
    lo, hi = -12 * sigma, 12 * sigma
    h = (hi - lo) / steps
    total = 0.0
    for i in range(steps + 1):
        g = lo + i * h
        a = abs(_act(act, g))
        if gated:
            p = tail(INT8_THRESHOLD / (sigma * a)) if a > 0 else 0.0
        else:
            p = 1.0 if a >= INT8_THRESHOLD else 0.0
        weight = 1 if i in (0, steps) else (4 if i % 2 else 2)
        total += weight * p * math.exp(-0.5 * (g / sigma) ** 2)
    return total * h / 3 / (sigma * math.sqrt(2 * math.pi))


def int8_outlier_columns(act: str, sigma: float, gated: bool, in_features: int, tokens: int) -> int:
    """Columns of the ``tokens`` x ``in_features`` input with at least one |x| >= 6: the
    ``subA`` copy ``MatMul8bitLt`` keeps (rows treated as independent)."""
    p = int8_outlier_probability(act, sigma, gated)
    return round(in_features * (1.0 - (1.0 - p) ** tokens))
