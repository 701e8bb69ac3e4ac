"""One pure function per stage, `run(cfg, paths) -> result`; same names in dvc.yaml and tasks/."""

STAGES = ("prepare", "validate", "train", "evaluate", "export")
