"""lejepa-cli: pretrain a vision encoder with LeJEPA (SIGReg + view invariance)."""

from lejepa_cli._version import __version__

__all__ = ["__version__", "load_encoder", "load_world_model"]


def __getattr__(name: str):
    # Lazy: `import lejepa_cli` stays cheap, and load_encoder needs only torch + safetensors.
    if name == "load_encoder":
        from lejepa_cli.export import load_encoder

        return load_encoder
    if name == "load_world_model":
        from lejepa_cli.world.export import load_world_model

        return load_world_model
    raise AttributeError(f"module 'lejepa_cli' has no attribute {name!r}")
