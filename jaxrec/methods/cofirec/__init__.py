"""CoFiRec and TIGER: semantic-ID tokenizers and generative retrieval.

`task: cofirec` (the generator) registers from `generator`; `task: cofirec.tokenizer`
is its own module, imported by name only when a config asks for it.
"""
from jaxrec.methods.cofirec import generator  # noqa: F401  (registers `cofirec`)
