"""Generation: prompt sets, long-prompt encoding, and paired base/LoRA images with their manifest.

`generate` and its config are imported on first use, so `fangzhi.generate.prompts` (used by
`fangzhi prompts check`) does not pull in torch and diffusers.
"""

__all__ = ["GenerateConfig", "LoraArm", "generate", "parse_seeds", "read_manifest"]


def __getattr__(name: str):
    if name == "generate":
        from fangzhi.generate.run import generate

        return generate
    if name in ("GenerateConfig", "LoraArm", "parse_seeds"):
        from fangzhi.generate import config

        return getattr(config, name)
    if name == "read_manifest":
        from fangzhi.generate.manifest import read_manifest

        return read_manifest
    raise AttributeError(f"module 'fangzhi.generate' has no attribute {name!r}")
