"""A custom import-linter contract: these packages import the standard library and nothing
else outside themselves (the pure core: no psutil, anyio, structlog, tomli-w, ...)."""

from __future__ import annotations

import sys
from typing import Any

from grimp import ImportGraph
from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


class StdlibOnlyContract(Contract):
    type_name = "stdlib_only"

    packages = fields.ListField(subfield=fields.StringField())

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        broken: list[dict[str, Any]] = []
        for package in self.packages:  # type: ignore[attr-defined]
            for module in sorted({package, *graph.find_descendants(package)}):
                for imported in sorted(graph.find_modules_directly_imported_by(module)):
                    inside = imported == package or imported.startswith(f"{package}.")
                    if inside or imported.split(".")[0] in sys.stdlib_module_names:
                        continue
                    lines = [
                        d["line_number"]
                        for d in graph.get_import_details(importer=module, imported=imported)
                    ]
                    broken.append({"importer": module, "imported": imported, "lines": lines})
        return ContractCheck(kept=not broken, metadata={"broken": broken})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for item in check.metadata["broken"]:
            where = ", ".join(f"l.{n}" for n in item["lines"])
            output.print_error(
                f"{item['importer']} -> {item['imported']} ({where}): only the standard "
                "library may be imported here"
            )
            output.new_line()
