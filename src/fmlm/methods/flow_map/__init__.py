"""Flow map language model (FMLM): stage 2, few-step and one-step generation.

Maths (METHOD.md §4). The flow map X_{s,t} transports the FLM's probability flow
from time s to time t. It is parameterised by the two-time denoiser

    δ_{s,t}(x) = softmax(net(x, τ_s, τ_t)),   always on the simplex,
    X_{s,t}(x) = ((1 − t)/(1 − s))·x + ((t − s)/(1 − s))·δ_{s,t}(x),

so δ_{t,t} = D_t (the FLM denoiser), X_{s,s} = id and X_{s,1} = δ_{s,1}. The
network is conditioned on the decoding-error times (τ_s, τ_t); all the flow-map
algebra below is in interpolant time t = t(τ).

Objectives (the teacher signal δ̄ is computed without gradient):

* ``semigroup`` (default): for s < u < t,
  δ̄ = λ·δ̂_{s,u}(I_s) + (1 − λ)·δ̂_{u,t}(X_{s,u}(I_s)), λ = (1−t)(u−s)/((1−u)(t−s)),
  a convex combination (on the simplex); loss KL(δ̄ ‖ δ̂_{s,t}(I_s)).
* ``lagrangian``: δ̄ = D_t(X_{s,t}(I_s)) − ((1−t)(t−s)/(1−s))·∂_t δ̂_{s,t}(I_s), one JVP in
  τ_t (times dτ/dt), projected back onto the simplex by sparsemax; loss KL.
* ``eulerian``: δ̄ = D_s(I_s) + ((t−s)/(1−t))·((1−s)·∂_s δ̂ + (D_s − I_s)·∇_x δ̂), one JVP in
  (τ_s, x) with tangent (dτ/dt at s, (D_s − I_s)/(1 − s)); loss MSE, or KL after projection.
  The coefficient c = (1−s)(t−s)/(1−t) diverges as t → 1, so by default (``eulerian_form=
  relaxed``, an fmlm choice) the target is one damped step of size 1/(1 + c) from δ̂ towards
  it, which is bounded and has the same fixed point; ``direct`` keeps the formula above
  (its MSE weights each pair by 1/(1 + c²)).

The diagonal term KL(D̂_t(I_t) ‖ δ̂_{t,t}(I_t)) ties δ_{t,t} to the frozen FLM teacher;
with self-distillation (no teacher) it becomes CE to the one-hot data, and the D's in
the Lagrangian/Eulerian targets come from the student's own diagonal δ_{t,t}.
"""

from fmlm.methods.flow_map.losses import kl_capped, kl_rows, softmax_, sparsemax
from fmlm.methods.flow_map.model import FMLM, OBJECTIVES
from fmlm.paths import flow_map

__all__ = ["FMLM", "OBJECTIVES", "flow_map", "kl_capped", "kl_rows", "softmax_", "sparsemax"]
