"""iLoRA (and LLaRA's LoRA as its one-expert case) on LLaRA-style hybrid prompts."""
from jaxrec.methods.ilora.task import ILoRAConfig, ILoRATask  # noqa: F401  (registers `task: ilora`)
