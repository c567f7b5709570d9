"""A planted linear-softmax task: small enough to exercise the trainer's machinery."""
from dataclasses import dataclass

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax

from jaxrec.train.task import EvalSet, Task, Variables, register


@dataclass(frozen=True)
class ToyModelConfig:
    dim: int = 8
    classes: int = 4
    n_train: int = 512
    blow_up_at_step: int = -1      # inject a NaN loss at this step (fault tests)
    frozen_file: str = ""          # a file standing for a frozen input (fingerprint tests)
    worse_after_step: int = -1     # validation scores drop by 1 after this many steps (best != newest)


class Records:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class Linear(nn.Module):
    classes: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "vocab")),
                            (x.shape[-1], self.classes))
        return x @ kernel


@register
class ToyTask(Task):
    name = "toy"
    model_config = ToyModelConfig

    def __init__(self, config, upstream=None):
        super().__init__(config, upstream)
        m = config.model
        rng = np.random.default_rng(0)
        self.true_w = rng.normal(size=(m.dim, m.classes)).astype(np.float32)
        x = rng.normal(size=(m.n_train + 256, m.dim)).astype(np.float32)
        y = (x @ self.true_w).argmax(-1).astype(np.int32)
        self.train = Records(x[: m.n_train], y[: m.n_train])
        self.valid = Records(x[m.n_train:], y[m.n_train:])
        self.net = Linear(m.classes)

    def fingerprints(self):
        if not self.config.model.frozen_file:
            return {}
        from jaxrec.weights.fingerprint import checkpoint_sha256
        return {"frozen_file": checkpoint_sha256(self.config.model.frozen_file)}

    def train_records(self):
        return self.train

    def eval_sets(self, stage):
        return [EvalSet(stage, self.valid, f"{stage} | toy accuracy")]

    def init(self, rng):
        params = self.net.init(rng, jnp.zeros((1, self.config.model.dim)))["params"]
        return Variables(trainable=params, state={"calls": jnp.zeros((), jnp.int32)})

    def loss(self, params, frozen, state, batch, rng, clock):
        logits = self.net.apply({"params": params}, batch["x"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        blow = self.config.model.blow_up_at_step
        if blow >= 0:
            # A counter in the model state marks the 0-based step whose loss turns NaN.
            loss = jnp.where(state["calls"] == blow, jnp.nan, loss)
        return loss, ({}, {"calls": state["calls"] + 1})

    def eval_step(self, params, frozen, state, batch):
        hit = (self.net.apply({"params": params}, batch["x"]).argmax(-1) == batch["y"]).astype(jnp.float32)
        worse = self.config.model.worse_after_step
        score = hit - ((worse >= 0) & (state["calls"] > worse)).astype(jnp.float32)
        return {"ndcg@10": score, "hr@10": hit}
