"""Sample-based KL estimators between the policy and a reference (Schulman 2020,
"Approximating KL Divergence", http://joschu.net/blog/kl-approx.html).

With tokens sampled from the policy and d = logp - ref_logp:

    k1 = d                                   unbiased for KL(pi || ref), high variance, can be < 0
    k2 = 0.5 * d^2                           biased, >= 0; on-policy its gradient is grad KL
    k3 = exp(-d) - (-d) - 1                  unbiased, >= 0, low variance (GRPO's KL penalty)

Elementwise: aggregate with `bridge.losses.aggregate` to use as a loss term, or subtract
(times a coefficient) from per-token rewards (the per-sequence reward penalty).

Which KL a *loss* term minimizes is set by its gradient, not its value (Tang & Munos 2025,
"On a few pitfalls in KL divergence gradient estimation for RL"). With y ~ pi and the
estimator differentiated through log pi only (the samples are not re-drawn):
    k1 as a loss: E_pi[grad log pi] = 0: no gradient in expectation. Use k1 in the reward only.
    k2 as a loss: E_pi[d grad log pi] = grad KL(pi || ref), the reverse KL.
    k3 as a loss: E_pi[(1 - ref/pi) grad log pi] = grad KL(ref || pi), the forward KL
                  (as in GRPO, Shao et al. 2024), although its value estimates KL(pi || ref). For k3 the log-ratio is clamped to
+-KL_LOG_RATIO_CLAMP before the exp (as verl does) so the value stays finite, and it is
evaluated as expm1(-d) + d, which unlike exp(-d) + d - 1 cannot round below 0 for tiny d.
"""
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_KL_ESTIMATORS = ("k2", "k3")  # k1 has zero expected gradient as a loss
KL_LOG_RATIO_CLAMP = 20.0


def kl_estimate(logp, ref_logp, kind="k3"):
    """Per-token KL(pi || ref) estimate from log-probs of sampled tokens; kind in k1/k2/k3."""
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"Unknown KL estimator {kind!r}; choose one of {KL_ESTIMATORS}.")
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio)
    ref_over_pi = jnp.clip(-log_ratio, -KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
    return jnp.expm1(ref_over_pi) - ref_over_pi  # expm1 keeps k3 >= 0 near d = 0 in f32
