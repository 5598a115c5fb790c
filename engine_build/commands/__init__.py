"""gendr-build subcommands (one module per group; see engine_build.cli)."""
