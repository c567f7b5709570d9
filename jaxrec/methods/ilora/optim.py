"""iLoRA's optimizer: Adam with three parameter groups and torch's skip-on-no-gradient.

| group     | learning rate      | weight decay (coupled L2, added to the gradient) |
| projector | schedule           | 1e-5                                              |
| gate      | 0.3 × schedule     | 1e-5                                              |
| adapters  | schedule           | 0                                                 |

The official scheduler keeps the router's 0.3 factor at every step (its warm-up start,
peak and floor are all scaled by 0.3), so here the gate group's rate is 0.3 × the shared
warm-up + cosine schedule.

In text-only micro-batches the official code freezes the projector (requires_grad=False),
and torch's Adam then skips it entirely: no moment update, no decay, no step. Optax with
a zero gradient would still decay the moments and move the weights by the momentum, so
the projector group is wrapped in `skip_if_no_gradient`: when its whole gradient is
exactly zero (no micro-batch of the step used the hybrid prompt) its parameters and Adam
state stay unchanged. The learning-rate schedule itself advances every step, as torch's
scheduler does.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

GROUPS = ("adapters", "projector", "gate")


def skip_if_no_gradient(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner`, except that an all-zero gradient leaves the parameters and state untouched."""

    def update(grads, state, params=None):
        leaves = jax.tree.leaves(grads)
        silent = jnp.logical_not(jnp.any(jnp.stack([jnp.any(g != 0) for g in leaves]))) if leaves else True
        updates, new_state = inner.update(grads, state, params)
        updates = jax.tree.map(lambda u: jnp.where(silent, jnp.zeros_like(u), u), updates)
        new_state = jax.tree.map(lambda new, old: jnp.where(silent, old, new), new_state, state)
        return updates, new_state

    return optax.GradientTransformation(inner.init, update)


def adam_group(schedule: optax.Schedule, factor: float, weight_decay: float, b1: float, b2: float,
               eps: float = 1e-8, skip_when_silent: bool = False) -> optax.GradientTransformation:
    """torch.optim.Adam for one parameter group: L2 added to the gradient, then Adam, then -lr."""
    adam = optax.chain(optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
                       optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    if skip_when_silent:
        adam = skip_if_no_gradient(adam)
    return optax.chain(adam, optax.scale_by_learning_rate(lambda step: factor * schedule(step)))


def ilora_optimizer(schedule: optax.Schedule, groups: dict[str, dict[str, Any]], b1: float,
                    b2: float) -> optax.GradientTransformation:
    """`groups`: {group name: dict(factor=, weight_decay=, skip_when_silent=)} for the
    top-level keys of the trainable tree ("adapters", "projector", "gate")."""
    return per_key({name: adam_group(schedule, b1=b1, b2=b2, **opts) for name, opts in groups.items()})


def per_key(transforms: dict[str, optax.GradientTransformation]) -> optax.GradientTransformation:
    """One transformation per top-level key of the parameter dict; the state is a dict of
    the groups' states. (Plain dict routing instead of `optax.multi_transform`, whose
    masked placeholders do not survive the trainer's sharding derivation.)"""

    def check(tree):
        if set(tree) != set(transforms):
            raise ValueError(f"trainable groups {sorted(tree)} do not match optimizer groups {sorted(transforms)}")

    def init(params):
        check(params)
        return {k: transforms[k].init(params[k]) for k in transforms}

    def update(grads, state, params=None):
        check(grads)
        out = {k: transforms[k].update(grads[k], state[k], None if params is None else params[k]) for k in transforms}
        return {k: u for k, (u, _) in out.items()}, {k: s for k, (_, s) in out.items()}

    return optax.GradientTransformation(init, update)
