"""`python -m lejepa_cli ...` (also what torchrun launches: `torchrun ... -m lejepa_cli train ...`)."""

from lejepa_cli.cli import main

main()
