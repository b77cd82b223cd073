"""lejepa-cli: pretrain a vision encoder with LeJEPA (SIGReg + view invariance)."""

__version__ = "0.1.0"
