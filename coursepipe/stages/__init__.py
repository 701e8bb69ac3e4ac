"""One function per stage, `run(cfg, recipe, paths) -> result`; same names in dvc.yaml and tasks/.

The door (cli.py) hands each stage the recipe's typed config and its Recipe object; a stage reads
only the params its dvc.yaml entry declares (tests/test_contract.py records what it reads).
"""

STAGES = ("prepare", "validate", "train", "evaluate", "export")
