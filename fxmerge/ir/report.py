"""Coverage report: what group inference could and could not make permutable, and why."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class FrozenAxis:
    param: str
    axis: int
    size: int
    reason: str


@dataclass(frozen=True)
class UnsupportedRecord:
    target: str
    node: str
    module_path: str
    source: str
    params: tuple[str, ...]


@dataclass
class CoverageReport:
    """Groups, permutable vs frozen parameter axes (with reasons), unreached and tied parameters."""

    frontend: str = ""
    n_groups: int = 0
    n_axes: int = 0
    n_permutable_axes: int = 0
    n_params: int = 0
    n_permutable_params: int = 0
    n_elements: int = 0
    n_permutable_elements: int = 0
    frozen: list[FrozenAxis] = field(default_factory=list)
    unreached: list[str] = field(default_factory=list)
    tied: list[list[str]] = field(default_factory=list)
    unsupported: list[UnsupportedRecord] = field(default_factory=list)

    @property
    def permutable_fraction(self) -> float:
        """Fraction of parameter elements that live in a tensor with at least one permutable axis."""
        return self.n_permutable_elements / self.n_elements if self.n_elements else 0.0

    def to_obj(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> CoverageReport:
        if not obj:
            return cls()
        obj = dict(obj)
        obj["frozen"] = [FrozenAxis(**f) for f in obj.get("frozen", [])]
        obj["unsupported"] = [UnsupportedRecord(**{**u, "params": tuple(u["params"])}) for u in obj.get("unsupported", [])]
        return cls(**obj)

    def __str__(self) -> str:
        lines = [
            f"Coverage ({self.frontend}): {self.n_groups} groups; "
            f"{self.n_permutable_axes}/{self.n_axes} parameter axes permutable; "
            f"{self.n_permutable_params}/{self.n_params} tensors "
            f"({100 * self.permutable_fraction:.1f}% of elements) touched by a group",
        ]
        if self.frozen:
            lines.append(f"  frozen axes ({len(self.frozen)}):")
            for f in self.frozen[:12]:
                lines.append(f"    {f.param}[{f.axis}] (size {f.size}): {f.reason}")
            if len(self.frozen) > 12:
                lines.append(f"    ... {len(self.frozen) - 12} more")
        if self.unreached:
            lines.append(f"  never reached by the graph ({len(self.unreached)}): {', '.join(self.unreached[:8])}")
        if self.tied:
            lines.append("  tied: " + "; ".join(" = ".join(t) for t in self.tied))
        if self.unsupported:
            lines.append(f"  unsupported ops frozen ({len(self.unsupported)}): "
                         + ", ".join(sorted({u.target for u in self.unsupported})))  # fmt: skip
        return "\n".join(lines)
