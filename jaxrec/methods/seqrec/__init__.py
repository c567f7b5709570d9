"""Plain sequential recommenders (SASRec, GRU4Rec) as the `seqrec` task."""
from jaxrec.methods.seqrec.task import SeqRecConfig, SeqRecTask

__all__ = ["SeqRecConfig", "SeqRecTask"]
