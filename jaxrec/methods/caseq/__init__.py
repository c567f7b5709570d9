"""CaseQ (Yang et al., NeurIPS 2022): hierarchical branching context encoders trained
with a backdoor-adjusted variational objective; `task: caseq`."""
from jaxrec.methods.caseq.task import CaseQConfig, CaseQTask  # noqa: F401  (registers the task)
