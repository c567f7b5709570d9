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
