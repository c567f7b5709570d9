"""Checkpoint retention: the best checkpoint by the selection metric survives a restart."""
import numpy as np

from jaxrec.train.checkpoint import RunCheckpoints


def _save(ckpts, step, metrics=None):
    ckpts.save(step, {"w": np.full(3, step, np.float32)}, None, meta={"step": step}, config={}, vocab={},
               metrics=metrics)


def test_best_checkpoint_is_kept_after_the_run_is_reopened(tmp_path):
    # Step 1 is the best and is neither of the two newest once steps 3 and 4 exist. The
    # metrics of step 1 and 2 were written by an earlier process: retention after the restart
    # must read them from disk.
    first = RunCheckpoints(tmp_path, keep=2, metric="ndcg@10", async_save=False)
    _save(first, 1, {"ndcg@10": 0.9})
    _save(first, 2, {"ndcg@10": 0.5})
    first.close()

    reopened = RunCheckpoints(tmp_path, keep=2, metric="ndcg@10", async_save=False)
    _save(reopened, 3)                                 # a periodic save carries no metrics
    _save(reopened, 4, {"ndcg@10": 0.4})
    reopened.close()
    assert RunCheckpoints(tmp_path, read_only=True).steps() == [1, 3, 4]


def test_without_keep_best_only_the_newest_are_kept(tmp_path):
    ckpts = RunCheckpoints(tmp_path, keep=2, keep_best=False, metric="ndcg@10", async_save=False)
    for step, value in ((1, 0.9), (2, 0.5), (3, 0.4)):
        _save(ckpts, step, {"ndcg@10": value})
    ckpts.close()
    assert RunCheckpoints(tmp_path, read_only=True).steps() == [2, 3]
