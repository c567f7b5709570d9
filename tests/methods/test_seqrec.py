"""The seqrec task on planted-structure data: it must learn what the generator planted."""
import pytest

from jaxrec.config import load_config, to_dict
from jaxrec.data.synthetic_reference import reference_metrics
from jaxrec.train.trainer import train
from tests.helpers import REPO


def test_plain_train_command_equals_the_main_job_config():
    plain, main_job = to_dict(load_config(None)), to_dict(load_config(REPO / "configs/sasrec_synthetic.yaml"))
    plain.pop("source"), main_job.pop("source")
    assert plain == main_job


@pytest.mark.slow
def test_sasrec_reaches_the_synthetic_reference(tmp_path):
    """The main job's model with half its epochs must pass the first-order Markov reference's
    95% and sit far above popularity (references: docs/data.md)."""
    config = load_config(REPO / "configs/sasrec_synthetic.yaml",
                         [f"run.dir={tmp_path}", "train.epochs=20", "train.progress=false", "train.eval_every=0"])
    result = train(config)
    ndcg = result.tests["test"]["ndcg@10"]
    refs = reference_metrics()["leave-one-out(min_length=3)"]["test"]
    assert ndcg >= 0.95 * refs["markov"]["NDCG@10"]
    assert ndcg >= 5 * refs["popularity"]["NDCG@10"]
    assert result.baselines["popularity"]["test"]["ndcg@10"] == pytest.approx(refs["popularity"]["NDCG@10"], abs=1e-6)


def test_cosine_score_space_gives_cosine_over_temperature():
    import numpy as np
    from jaxrec.eval.scoring import score_space
    rng = np.random.default_rng(0)
    h, table = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=(7, 5)).astype(np.float32)
    table[0] = 0.0     # the pad row must not produce NaNs
    q, t = score_space(h, table, "cosine", 0.05)
    expected = (h @ table.T) / np.linalg.norm(h, axis=1)[:, None] / np.maximum(np.linalg.norm(table, axis=1), 1e-6) / 0.05
    np.testing.assert_allclose(np.asarray(q @ t.T), expected, rtol=1e-5, atol=1e-5)
    same_q, same_t = score_space(h, table, "dot", 0.05)
    assert same_q is h and same_t is table
