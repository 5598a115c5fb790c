"""`gendr-build default` and `gendr-build import-sr`: the SR commands, their shared steps and progress."""
