"""One module per stage, each with `run(cfg) -> Path` returning the folder it produced."""
