"""Where every stage reads and writes, relative to one root (the project, or shared storage)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    """One name per output, used by the stages, dvc.yaml and the tests alike."""
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).resolve())

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def data(self) -> Path:             # raw archives, tracked by data.dvc; no stage writes here
        return self.root / "data"

    @property
    def gx(self) -> Path:               # Great Expectations file context (suites committed)
        return self.root / "gx"

    def suite(self, recipe: str) -> Path:
        return self.gx / "expectations" / f"{recipe}.json"

    def prepared(self, recipe: str) -> Path:
        return self.root / "prepared" / recipe

    def validation_report(self, recipe: str) -> Path:
        return self.root / "reports" / recipe / "validation.json"

    def model(self, recipe: str) -> Path:
        return self.root / "models" / recipe

    def history(self, recipe: str) -> Path:      # train's per-epoch metrics (a DVC plot)
        return self.root / "reports" / recipe / "history.csv"

    def plots(self, recipe: str) -> Path:        # evaluate's pictures and tables, whatever the kind
        return self.root / "plots" / recipe

    def metrics(self, recipe: str) -> Path:
        return self.root / "metrics" / f"{recipe}.json"

    def export(self, recipe: str) -> Path:
        return self.root / "export" / recipe

    def runs(self, storage: str) -> str:
        """Ray Train storage: outside DVC outputs so a repro never deletes checkpoints.

        Ray needs an absolute path or a URI (a relative one kills its controller)."""
        if "://" in storage or Path(storage).is_absolute():
            return storage
        return str(self.root / storage)
