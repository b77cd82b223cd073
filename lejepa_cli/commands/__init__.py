"""The Typer commands of `lejepa`, one module per command or command group, named after it
(lejepa_cli/cli.py assembles the app and keeps `lejepa train`)."""
