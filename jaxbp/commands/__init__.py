"""One module per `jaxbp` command; see jaxbp/cli.py for the contract."""
