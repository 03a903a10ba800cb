"""fangzhi (方志): teach Stable Diffusion a painting style with LoRA and prove it worked."""

__version__ = "0.1.0"

import logging

# bitsandbytes warns on import that an optional 4-bit CPU kernel is missing; fangzhi never uses 4-bit layers.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
